"""Uploaded training files: every line checked as the local loader checks it, the first bad one named."""
import io

import pytest

from flexc.runtime.server.errors import APIError
from flexc.runtime.server.files import check_jsonl


def test_counts_examples_of_every_format():
    """Blank lines and a leading BOM are skipped; each of the four formats counts as one example."""
    body = ('\ufeff{"text": "a"}\n\n{"prompt": "p", "completion": "c"}\n{"input_ids": [1, 2]}\n'
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    assert check_jsonl(io.BytesIO(body.encode())) == 4


@pytest.mark.parametrize("body,needle", [
    (b'{"text": "a"}\n{"text": "b",}\n', "line 2: not valid JSON at character 14, '}': Expecting property name"),
    (b'{"messages": [{"role": "user", "content": "q"}]}\n', "line 1: 'messages' has no assistant turn"),
    (b'{"foo": 1}\n', "line 1: unknown example format with keys ['foo']; expected {\"messages\""),
    (b'\xff\xfe\n', "line 1: not UTF-8 text (byte 0)"),
    (b"\n \n", "the file has no examples; expected one JSON object per line"),
])
def test_bad_upload_is_a_400_naming_the_line(body, needle):
    """A malformed, unknown or structurally wrong line (or no example at all) is a 400 invalid_file whose message
    names the line and what was expected."""
    with pytest.raises(APIError) as e:
        check_jsonl(io.BytesIO(body))
    assert e.value.status == 400 and e.value.code == "invalid_file" and e.value.message.startswith(needle)
