"""The `mpstore` command: outputs, --json, and one-line errors that leave the store unchanged."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from mpcli.main import cli
from mpstore import Store
from mpstore.manifest_log import Commit
from mpstore.snapshot import FileEntry, Manifest, Segment

from tests.conftest import folder_digest, store_state


def run(store: Path, *args: str):
    return CliRunner().invoke(cli, ["--store", str(store), *args], catch_exceptions=False)


@pytest.fixture
def populated(tmp_path, suite) -> Path:
    path = tmp_path / "store"
    assert run(path, "init", "--block-size", "4KiB").exit_code == 0
    assert run(path, "ingest", str(suite["base"]), "--name", "base").exit_code == 0
    assert run(path, "ingest", str(suite["lora-0"]), "--name", "experts/lora", "--base", "base").exit_code == 0
    return path


def test_ingest_json_reports_blocks_and_bytes(tmp_path, suite):
    path = tmp_path / "s"
    run(path, "init")
    result = run(path, "ingest", str(suite["base"]), "--name", "base", "--json")
    doc = json.loads(result.output)
    assert doc["name"] == "base" and doc["blocks_new"] == doc["blocks"] > 0
    assert doc["input_bytes"] == sum(f.stat().st_size for f in suite["base"].rglob("*") if f.is_file())


def test_ls_show_log_du_fsck_json(populated):
    listing = json.loads(run(populated, "ls", "--json").output)
    assert {tuple(r["refs"]) for r in listing} == {("base",), ("experts/lora",)}
    lora = json.loads(run(populated, "show", "experts/lora", "--json").output)
    base_id = next(r["id"] for r in listing if r["refs"] == ["base"])
    assert lora["base"] == base_id and lora["parents"] == [base_id]
    assert any(t["changed_blocks"] for t in lora["tensors"] if "q_proj" in t["name"])
    assert all(t["changed_blocks"] == 0 for t in lora["tensors"] if "mlp" in t["name"])
    lineage = json.loads(run(populated, "log", "experts/lora", "--json").output)
    assert [d["id"] for d in lineage] == [lora["id"], base_id]
    usage = json.loads(run(populated, "du", "--json").output)
    assert usage["blocks"] > 0 and 0 < usage["ratio"] < 1
    report = run(populated, "fsck", "--json")
    assert report.exit_code == 0 and json.loads(report.output)["ok"] is True


def test_human_output_names_refs(populated):
    out = run(populated, "ls").output
    assert "experts/lora" in out and "base" in out
    assert "model.safetensors" in run(populated, "show", "base").output


def test_export_json_and_byte_identity(populated, suite, tmp_path):
    out = tmp_path / "exported"
    result = run(populated, "export", "experts/lora", str(out), "--json")
    assert result.exit_code == 0 and json.loads(result.output)["files"] == len(folder_digest(suite["lora-0"]))
    assert folder_digest(out) == folder_digest(suite["lora-0"])


def test_ref_commands(populated):
    assert run(populated, "ref", "set", "alias", "base").exit_code == 0
    assert run(populated, "ref", "mv", "alias", "renamed").exit_code == 0
    refs = Store.open(populated).refs()
    assert "renamed" in refs and "alias" not in refs
    assert run(populated, "ref", "rm", "renamed").exit_code == 0
    assert "renamed" not in Store.open(populated).refs()


def test_help_teaches_the_commands():
    out = CliRunner().invoke(cli, ["--help"]).output
    for command in ("init", "ingest", "ls", "show", "export", "du", "fsck", "log", "ref"):
        assert command in out
    assert "MPSTORE_PATH" in out


def test_listing_commands_do_not_import_torch(populated):
    # ls/show/log/du must answer fast: the store layer never imports torch.
    code = (
        "import sys; from mpcli.main import main; sys.argv=['mpstore','--store',%r,'%s'];\n"
        "try: main()\nexcept SystemExit: pass\nassert 'torch' not in sys.modules, '%s imported torch'"
    )
    for command in ("ls", "du", "log"):
        proc = subprocess.run(
            [sys.executable, "-c", code % (str(populated), command, command)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr


# -- bad input: one line, non-zero exit, store unchanged -----------------------------------------


def _safetensors_bytes(tmp_path: Path) -> bytes:
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(2)}, tmp_path / "tmp.safetensors")
    return (tmp_path / "tmp.safetensors").read_bytes()


def _header_of(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def _with_header(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _bad_folder(tmp_path: Path, case: str) -> Path:
    folder = tmp_path / case
    folder.mkdir()
    good = _safetensors_bytes(tmp_path)
    header = _header_of(good)
    body = good[8 + struct.unpack("<Q", good[:8])[0] :]
    target = folder / "model.safetensors"
    if case == "truncated":
        target.write_bytes(good[:-10])
    elif case == "header_beyond_file":
        target.write_bytes(struct.pack("<Q", 10**9) + good[8:])
    elif case == "overlapping":
        header["b"]["data_offsets"] = [60, 68]
        target.write_bytes(_with_header(header, body))
    elif case == "gapped":
        header["b"]["data_offsets"] = [68, 76]
        target.write_bytes(_with_header(header, body + b"\0" * 4))
    elif case == "dtype_shape_mismatch":
        header["a"]["shape"] = [5, 4]
        target.write_bytes(_with_header(header, body))
    elif case == "duplicate_names":
        text = json.dumps(header).encode()
        dup = text[:-1] + b', "a": ' + json.dumps(header["a"]).encode() + b"}"
        target.write_bytes(struct.pack("<Q", len(dup)) + dup + body)
    elif case == "invalid_json":
        text = b"{not json" + b" " * 20
        target.write_bytes(struct.pack("<Q", len(text)) + text + body)
    elif case == "index_missing_shard":
        target.unlink(missing_ok=True)
        (folder / "model-00001-of-00002.safetensors").write_bytes(good)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps(
                {
                    "metadata": {},
                    "weight_map": {"a": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"},
                }
            )
        )
    elif case == "empty_folder":
        pass
    return folder


BAD_FOLDERS = {
    "truncated": "truncated",
    "header_beyond_file": "header",
    "overlapping": "overlap",
    "gapped": "gap",
    "dtype_shape_mismatch": "do not match",
    "duplicate_names": "duplicate",
    "invalid_json": "JSON",
    "index_missing_shard": "model-00002-of-00002.safetensors",
    "empty_folder": "empty",
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_model_folder_is_one_line_error_and_leaves_store_unchanged(populated, tmp_path, case):
    folder = _bad_folder(tmp_path, case)
    before = store_state(populated)
    result = CliRunner().invoke(cli, ["--store", str(populated), "ingest", str(folder), "--name", "bad"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpstore: error: "), result.output
    assert BAD_FOLDERS[case].lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in result.output
    assert store_state(populated) == before


@pytest.mark.parametrize(
    "args, needle",
    [
        (["ingest", "/does/not/exist", "--name", "x"], "/does/not/exist"),
        (["show", "no-such-ref"], "no-such-ref"),
        (["export", "no-such-ref", "/tmp/mp-never-written"], "no-such-ref"),
        (["log", "abcdef00"], "abcdef00"),
        (["ingest", "{suite_base}", "--name", "base"], "already exists"),
        (["ingest", "{suite_base}", "--name", "bad..name"], "invalid ref name"),
        (["ingest", "{suite_base}", "--name", "x", "--base", "missing"], "missing"),
        (["ref", "rm", "nope"], "nope"),
    ],
)
def test_user_mistakes_are_one_line_errors(populated, suite, args, needle):
    args = [a.replace("{suite_base}", str(suite["base"])) for a in args]
    before = store_state(populated)
    result = CliRunner().invoke(cli, ["--store", str(populated), *args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpstore: error: ") and needle in lines[0], result.output
    assert store_state(populated) == before


def test_errors_from_a_real_process_have_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mpcli.main", "--store", str(tmp_path / "none"), "ls"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("mpstore: error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_export_into_a_non_empty_folder_is_refused(populated, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["--store", str(populated), "export", "base", str(out)])
    assert result.exit_code == 1 and "not an empty folder" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_stored_file_name_that_escapes_the_export_folder_is_refused(populated, tmp_path):
    store = Store.open(populated)
    base = store.manifest("base")
    evil = Manifest(
        block_bytes=base.block_bytes,
        tensors=base.tensors,
        files=base.files
        + (
            FileEntry(
                "../evil.txt",
                0,
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                (Segment(blocks=(), size=0),),
            ),
        ),
    )
    store.commit(Commit(manifests=[evil.encode()], refs={"evil": evil.id}))
    store.close()
    out = tmp_path / "export" / "inner"
    result = CliRunner().invoke(cli, ["--store", str(populated), "export", "evil", str(out)])
    assert result.exit_code == 1 and "../evil.txt" in result.output
    assert not (tmp_path / "export" / "evil.txt").exists()
