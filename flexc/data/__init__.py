"""Datasets shipped with flexc: the facts about the fictional planet Veltrax that the main job teaches a new
adapter (``VELTRAX_TRAIN``, chat ``messages`` lines) and the questions it asks before and after
(``VELTRAX_EVAL``)."""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
VELTRAX_TRAIN = os.path.join(_HERE, "veltrax.jsonl")
VELTRAX_EVAL = os.path.join(_HERE, "veltrax_eval.jsonl")
