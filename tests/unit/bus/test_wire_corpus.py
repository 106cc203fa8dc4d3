"""The wire corpus (tests/fixtures/wire, see generate.py there): messages written by an earlier codec and by
external producers decode to what was recorded, re-encode to the same wire map, and invalid ones get the recorded
error, word for word. A codec change that alters the wire format or an error text fails here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

from bus import codec
from bus.codec import Limits, decode, encode
from bus.schema import KINDS, MessageError

CORPUS = Path(__file__).resolve().parents[2] / "fixtures" / "wire"
VALID: dict[str, dict[str, Any]] = json.loads((CORPUS / "valid.json").read_text())
INVALID: dict[str, dict[str, Any]] = json.loads((CORPUS / "invalid.json").read_text())


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("wire_corpus_generate", CORPUS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plain = _generator().plain


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_fixture_decodes_as_recorded(name: str) -> None:
    case = VALID[name]
    data = (CORPUS / "valid" / f"{name}.msgpack").read_bytes()
    limits = Limits(**case["limits"])
    decoded = decode(data, limits)
    assert plain(decoded) == case["expected"]
    again = encode(decoded, limits=limits)
    assert plain(decode(again, limits)) == case["expected"]
    if case["source"] == "codec":  # the encoder still writes the same map (key order aside)
        assert msgpack.unpackb(again) == msgpack.unpackb(data)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_fixture_fails_with_recorded_error(name: str) -> None:
    case = INVALID[name]
    data = (CORPUS / "invalid" / f"{name}.msgpack").read_bytes()
    with pytest.raises(MessageError) as info:
        decode(data, Limits(**case["limits"]))
    assert str(info.value) == case["error"]


def test_corpus_holds_every_kind_from_both_sources() -> None:
    kinds = {case["expected"]["__message__"] for case in VALID.values()}
    assert kinds == {cls.__name__ for cls in KINDS}
    assert {case["source"] for case in VALID.values()} == {"codec", "external"}
    assert len(INVALID) >= 50


def test_valid_fixtures_decode_by_their_wire_types_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """msgspec's typed decode takes every valid message of the corpus; the slow msgpack path (which names the
    broken rule) is for refused messages only, so a wire type that refuses a valid form fails here, not just slowly."""

    def refuse(*args: Any) -> None:
        raise AssertionError("decoded by the slow path")

    monkeypatch.setattr(codec, "_decode_slowly", refuse)
    for name, case in VALID.items():
        data = (CORPUS / "valid" / f"{name}.msgpack").read_bytes()
        assert plain(decode(data, Limits(**case["limits"]))) == case["expected"], name
