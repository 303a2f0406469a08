"""Atomic writes keep the old file when the new one fails half-way."""

from __future__ import annotations

import pytest

from iqa_env.files import atomic_write, atomic_write_text


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "results.json"
    atomic_write_text(target, "old")

    def broken(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_short_reason_keeps_whole_sentences_on_one_line():
    from iqa_env.files import short_reason

    torch_like = RuntimeError(
        "PytorchStreamReader failed reading zip archive: failed finding central directory. This is an "
        "internal miniz error. If you are seeing this error, there is a high likelihood that your\ncheckpoint "
        "file is corrupted. This can happen if the checkpoint was not saved properly."
    )
    reason = short_reason(torch_like, limit=120)
    assert reason == (
        "PytorchStreamReader failed reading zip archive: failed finding central directory. This is an internal miniz error."
    )
    assert short_reason(ValueError("short\nmessage")) == "short message"
    assert short_reason(EOFError()) == "EOFError"
    long_sentence = short_reason(ValueError("x" * 300), limit=50)
    assert long_sentence.endswith(" ...") and len(long_sentence) <= 50
