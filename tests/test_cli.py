"""The `memory3` command line: help, an encode -> bank info -> generate -> delete -> compact
-> reencode round trip in-process, the same round trip as real subprocesses, and user
mistakes as one line on stderr with exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from memory3.cli import main
from memory3.memory.bank import Bank

N_REFS = 24


def write_kb(path, n=N_REFS):
    rows = [{"id": f"p{i}", "text": f"Person {i} lives in town {i % 5} and likes the number {7 * i}.",
             "source": "test"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "memory3.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(rc, err, *words):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and "untrained preset" not in line]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """An int8 bank of a 24-reference KB encoded by the tiny preset, through the CLI in-process."""
    d = tmp_path_factory.mktemp("cli")
    kb = write_kb(d / "kb.jsonl")
    assert main(["encode", str(kb), "--model", "tiny", "--out", str(d / "bank"), "--quiet", "--batch-size", "5"]) == 0
    return d


@pytest.mark.parametrize("command", [[], ["encode"], ["generate"], ["bank"], ["bank", "info"], ["bank", "delete"],
                                     ["bank", "compact"], ["bank", "reencode"], ["info"], ["train"], ["demo"]])
def test_help_explains_each_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: memory3") and len(out.splitlines()) > 4
    if command == ["encode"]:
        assert "--codec" in out and "--batch-size" in out and "torchrun" in out
    if command == ["generate"]:
        assert "--max-new-tokens" in out and "--bank" in out and "preset" in out
    if command == ["train"]:  # the trainer's own options, reached through `memory3 train`
        assert out.startswith("usage: memory3 train") and "--recipe" in out and "--steps" in out


def test_train_options_reach_the_trainer(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--recipe", "no-such-recipe", "--out", "x"])
    assert e.value.code == 2
    assert "no-such-recipe" in capsys.readouterr().err


def test_encode_info_generate_in_process(encoded, capsys):
    bank_dir = encoded / "bank"
    with Bank.open(bank_dir) as bank:
        assert len(bank) == N_REFS and bank.manifest.codec["name"] == "int8"
        assert bank.references([3])[0].id == "p3" and bank.references([3])[0].source == "test"
    capsys.readouterr()
    # re-running adds nothing; a different codec for an existing bank is refused
    assert main(["encode", str(encoded / "kb.jsonl"), "--model", "tiny", "--out", str(bank_dir), "--quiet"]) == 0
    assert "0 references encoded (24 unchanged)" in capsys.readouterr().err
    rc = main(["encode", str(encoded / "kb.jsonl"), "--model", "tiny", "--out", str(bank_dir), "--codec", "fp16"])
    assert_user_error(rc, capsys.readouterr().err, "stores codec int8, not fp16")
    assert main(["bank", "info", str(bank_dir), "--json", "--model", "tiny"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["live"] == N_REFS and info["model_matches"] is True and info["codec"] == "int8"
    assert info["embedder"]["name"] == "all-MiniLM-L6-v2" and "index/flat.faiss" in info["index"]

    prompt = "Person 3 lives in town 3 and likes the number 21. Person 3"
    assert main(["generate", "--model", "tiny", "--bank", str(bank_dir), "--max-new-tokens", "8",
                 "--show-retrieval", "--no-overlap-filter", prompt]) == 0
    out, err = capsys.readouterr()
    assert "untrained preset" in err and len(out) > 1
    chunk0 = next(line for line in err.splitlines() if line.startswith("prompt 0 chunk 0: query"))
    assert "p3 (" in chunk0  # the reference it was written from is among the 5
    # every reference repeats the prompt's template (overlap > 2/3): the default filter drops them all
    assert main(["generate", "--model", "tiny", "--bank", str(bank_dir), "--max-new-tokens", "8",
                 "--show-retrieval", prompt]) == 0
    err = capsys.readouterr().err
    assert "prompt 0 chunk 0: query 'Person 3 lives in town 3 and likes the n' -> nothing" in err
    # two prompts: one batch, each printed after its prompt
    assert main(["generate", "--model", "tiny", "--bank", str(bank_dir), "--max-new-tokens", "4", "a b", "c d"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- a b\n") and "\n--- c d\n" in out


def test_bank_delete_compact_reencode(encoded, capsys, tmp_path):
    import shutil

    bank_dir = tmp_path / "bank"
    shutil.copytree(encoded / "bank", bank_dir)
    assert main(["bank", "delete", str(bank_dir), "p1", "p2", "nope"]) == 0
    assert "deleted 2 of 3 ids" in capsys.readouterr().out
    assert main(["bank", "compact", str(bank_dir)]) == 0
    assert "dropped 2 deleted rows" in capsys.readouterr().out
    with Bank.open(bank_dir) as bank:
        assert bank.rows == N_REFS - 2 and bank.lookup(["p1", "p3"]) == [None, 1]
    # reencode with another model: the bank follows it (new fingerprint, new memories)
    from memory3.model import Memory3Config, Memory3Model, save_pretrained

    torch.manual_seed(5)
    other = Memory3Model(Memory3Config.preset("tiny"))
    save_pretrained(other, tmp_path / "model")
    rc = main(["generate", "--model", str(tmp_path / "model"), "--bank", str(bank_dir), "x"])
    assert rc == 2 and "bank reencode" in capsys.readouterr().err
    assert main(["bank", "reencode", str(bank_dir), "--model", str(tmp_path / "model")]) == 0
    capsys.readouterr()
    assert main(["bank", "info", str(bank_dir), "--json", "--model", str(tmp_path / "model")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_matches"] is True and info["live"] == N_REFS - 2


def test_user_mistakes_are_one_line_exit_2(tmp_path, encoded, capsys):
    kb = tmp_path / "kb.jsonl"
    kb.write_text('{"id": 1, "text": "fine"}\n\n{"id": 2, "text": "broken"\n')
    cases = [
        (["encode", str(tmp_path / "missing.jsonl"), "--model", "tiny", "--out", str(tmp_path / "b")],
         ["missing.jsonl", "does not exist"]),
        (["encode", str(kb), "--model", "tiny", "--out", str(tmp_path / "b")], ["kb.jsonl line 3", "not valid JSON"]),
        (["encode", str(encoded / "kb.jsonl"), "--model", "./no/such/model", "--out", str(tmp_path / "b")],
         ["no such model directory"]),
        (["generate", "--model", "nonsense", "x"], ["neither a model directory nor a preset"]),
        (["generate", "--model", "small", "--bank", str(encoded / "bank"), "hello"], ["fingerprint", "reencode"]),
        (["bank", "info", str(tmp_path / "nobank")], ["nobank", "does not exist"]),
        (["generate", "--model", "tiny", "--max-new-tokens", "0", "x"], ["--max-new-tokens must be >= 1"]),
        (["encode", str(kb), "--model", "tiny"], ["required", "--out"]),
    ]
    for argv, words in cases:
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own usage errors
            rc = e.code
        assert_user_error(rc, capsys.readouterr().err, *words)
    for line, words in [('{"id": "a"}', ['"text" must be a non-empty string']), ("[1, 2]", ["expected an object"]),
                        ('{"id": "a", "text": "t", "url": "u"}', ["unknown field"]),
                        ('{"id": "a", "text": "t"}\n{"id": "a", "text": "u"}', ["line 2", "already appears on line 1"])]:
        kb.write_text(line + "\n")
        assert_user_error(main(["encode", str(kb), "--model", "tiny", "--out", str(tmp_path / "b")]),
                          capsys.readouterr().err, *words)
    assert not (tmp_path / "b").exists()


def test_subprocess_round_trip_and_errors(tmp_path, encoded):
    kb = write_kb(tmp_path / "kb.jsonl", n=12)
    r = run_cli("encode", kb, "--model", "tiny", "--out", tmp_path / "bank", "--quiet", "--codec", "fp16")
    assert r.returncode == 0, r.stderr
    assert "12 references encoded" in r.stderr
    r = run_cli("bank", "info", tmp_path / "bank")
    assert r.returncode == 0 and "12 live, 0 deleted" in r.stdout and "fp16" in r.stdout
    r = run_cli("generate", "--model", "tiny", "--bank", tmp_path / "bank", "--max-new-tokens", "5", "Person 1 lives")
    assert r.returncode == 0, r.stderr
    assert "untrained preset" in r.stderr and "hit rate" in r.stderr
    # errors from a real process: one line, exit 2, no traceback
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "text": "ok"}\nnot json\n')
    r = run_cli("encode", bad, "--model", "tiny", "--out", tmp_path / "b2")
    assert_user_error(r.returncode, r.stderr, "bad.jsonl line 2")
    r = run_cli("generate", "--model", "small", "--bank", tmp_path / "bank", "x")
    assert_user_error(r.returncode, r.stderr, "fingerprint")
    r = run_cli("bank", "compact")
    assert_user_error(r.returncode, r.stderr, "required")
