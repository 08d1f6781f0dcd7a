"""`fdkeeper run --shard K/N`: every file in exactly one shard, the same shard wherever the
checkout is and however the shell listed the files; a bad K/N is a usage error; each
shard's JUnit names its shard."""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from fdkeeper.testrun.command import run_command
from fdkeeper.testrun.shard import Shard, parse_shard
from tests.support.junit import check_junit_schema

FILES = [f"suite/{folder}/test-{number}.yaml" for folder in ("a", "b", "c") for number in range(7)]


def shards(paths: list[Path], count: int) -> list[list[Path]]:
    return [Shard(index, count).select(paths) for index in range(1, count + 1)]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 21, 30])
def test_the_shards_hold_every_file_exactly_once_and_evenly(count):
    paths = [Path(name) for name in FILES]
    chosen = shards(paths, count)
    union = [path for shard in chosen for path in shard]
    assert sorted(union) == sorted(paths)
    assert max(map(len, chosen)) - min(map(len, chosen)) <= 1


def test_a_shard_is_the_same_wherever_the_checkout_is_and_in_any_order():
    here = [Path("/home/runner/work/repo") / name for name in FILES]
    there = [Path("/builds/group/repo") / name for name in FILES]
    relative = [Path(name) for name in FILES]
    shuffled = random.Random(18).sample(relative, len(relative))
    for index in (1, 2, 3):
        shard = Shard(index, 3)
        picked = [path.relative_to("/home/runner/work/repo") for path in shard.select(here)]
        assert picked == [path.relative_to("/builds/group/repo") for path in shard.select(there)]
        assert picked == shard.select(relative) == shard.select(shuffled)


def test_a_file_given_twice_runs_once():
    paths = [Path("a.yaml"), Path("b.yaml"), Path("./a.yaml")]
    assert sorted(path.name for shard in shards(paths, 2) for path in shard) == ["a.yaml", "b.yaml"]


@pytest.mark.parametrize("text", ["0/3", "4/3", "3", "1/0", "a/b", "-1/2", "1/2/3", ""])
def test_a_bad_shard_is_refused_saying_the_form(text):
    with pytest.raises(ValueError, match="expected K/N with 1 <= K <= N"):
        parse_shard(text)


def test_a_bad_shard_is_a_usage_error_before_anything_runs(tmp_path):
    test = tmp_path / "t.yaml"
    test.write_text("steps:\n  - {name: a, command: 'touch ran'}\n")
    result = CliRunner().invoke(run_command, [str(test), "--shard", "4/3", "--logs", str(tmp_path / "logs")])
    assert result.exit_code == 2 and "--shard" in result.output and "1 <= K <= N" in result.output
    assert not (tmp_path / "ran").exists()


def test_the_shards_of_a_run_run_each_file_once_and_name_their_shard(tmp_path):
    for number in range(5):
        (tmp_path / f"t{number}.yaml").write_text(f"steps:\n  - {{name: a, command: 'touch ran-{number}'}}\n")
    tests = sorted(str(path) for path in tmp_path.glob("t*.yaml"))
    ran: list[str] = []
    for index in (1, 2, 3):
        report = tmp_path / f"shard-{index}.xml"
        args = [*tests, "--shard", f"{index}/3", "--junit", str(report), "--logs", str(tmp_path / "logs")]
        result = CliRunner().invoke(run_command, args)
        assert result.exit_code == 0, result.output
        check_junit_schema(report)
        suite = ET.parse(report).getroot().find("testsuite")
        assert suite.get("name") == f"fdkeeper run (shard {index}/3)"
        assert [(p.get("name"), p.get("value")) for p in suite.iter("property")] == [("shard", f"{index}/3")]
        ran += [case.get("classname") for case in suite.iter("testcase")]
    assert sorted(ran) == [f"t{number}" for number in range(5)]
    assert sorted(path.name for path in tmp_path.glob("ran-*")) == [f"ran-{number}" for number in range(5)]
