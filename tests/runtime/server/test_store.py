"""The data directory: whole records only, server-made ids only, torn event lines skipped."""
import io
import os

import pytest

from flexc.runtime.server.store import Store, new_id


def test_files_and_jobs_survive_a_new_store(tmp_path):
    """Files and jobs written by one Store are listed by the next (what a restart sees); a half-written upload
    left by a crash is neither listed nor kept."""
    s = Store(str(tmp_path))
    fid = new_id("file")
    s.add_file(io.BytesIO(b'{"text": "a"}\n'), {"id": fid, "bytes": 14})
    jid = new_id("ftjob")
    s.save_job({"id": jid, "status": "running"})
    s.append_event(jid, {"id": "e1"})
    open(os.path.join(s.files_dir, new_id("file") + ".jsonl.part"), "w").write("half")
    t = Store(str(tmp_path))
    assert [m["id"] for m in t.load_files()] == [fid] and [j["id"] for j in t.load_jobs()] == [jid]
    assert not [n for n in os.listdir(t.files_dir) if n.endswith(".part")]
    assert open(t.content_path(fid)).read() == '{"text": "a"}\n'


def test_torn_event_line_is_skipped(tmp_path):
    """An events file whose last line a kill cut in half reads as the whole lines before it."""
    s = Store(str(tmp_path))
    jid = new_id("ftjob")
    s.save_job({"id": jid})
    s.append_event(jid, {"id": "e1"})
    with open(os.path.join(s.job_dir(jid), "events.jsonl"), "a") as f:
        f.write('{"id": "e2", "mess')
    assert s.events(jid) == [{"id": "e1"}]


@pytest.mark.parametrize("kind,bad", [("file", "../etc/passwd"), ("file", "file-xyz"),
                                      ("file", "file-" + "0" * 23 + "/"), ("job", "ftjob-../../x"),
                                      ("job", "ftjob-" + "a" * 24 + "/..")])
def test_only_server_ids_become_paths(tmp_path, kind, bad):
    """A string that is not an id the server generates never becomes a path."""
    s = Store(str(tmp_path))
    with pytest.raises(ValueError, match="not a"):
        s.content_path(bad) if kind == "file" else s.job_dir(bad)
