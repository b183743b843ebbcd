"""The tile knowledge base and its tools: searches with each strategy record a checked
candidate, wrong candidates are rejected, records change the tile ops and fused kernels
launch with (and bad ones are ignored), export/import round trips and refuses other
machines and corrupted files, concurrent writers and importers leave every record
readable. No timing is asserted: where a search must record, the default tile is made
slow by the test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import pytest
import torch
from typer.testing import CliRunner

import tessera
import tessera.tools.tuning
from tessera.cli import app
from tessera.errors import TuneError
from tessera.graph import fusion
from tessera.ops import reduce, registry
from tessera.runtime import knowledge
from tessera.runtime.cache import default_cache
from tessera.tools.tuning import op_target
from tessera.tune import ShareError, export_records, import_records, tune_tile
from tessera.tune.share import _digest

SHAPE = (24, 40)  # an odd shape no other test tunes: softmax's tile (64, 48) by default
KEY = knowledge.tile_key("softmax", "32x40", "float32")


@pytest.fixture(scope="module", autouse=True)
def module_cache(tmp_path_factory):
    """A cache of the module's own, so its knowledge records are its alone, sharing the
    session's compiled modules and graphs (no kernel compiles twice); restored afterwards."""
    session = default_cache().base
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TESSERA_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        default_cache().base.mkdir(parents=True, exist_ok=True)
        for kind in ("modules", "graph"):
            (session / kind).mkdir(parents=True, exist_ok=True)
            (default_cache().base / kind).symlink_to(session / kind, target_is_directory=True)
        yield
    knowledge.reload()


@pytest.fixture(autouse=True)
def no_records():
    """Every test starts with an empty knowledge base."""
    def clear():
        shutil.rmtree(default_cache().base / "knowledge", ignore_errors=True)
        knowledge.reload()
    clear()
    yield
    clear()


def _slow_default(target):
    """The target with its default tile made 20 ms slower: a search must beat it."""
    run = target.run

    def slow(tile):
        if tile == target.default:
            time.sleep(0.02)
        return run(tile)
    target.run = slow
    return target


@pytest.mark.parametrize("strategy", ["exhaustive", "random", "model"])
def test_each_strategy_records_a_checked_candidate(strategy):
    target = _slow_default(op_target("softmax", SHAPE))
    assert (target.kernel, target.shape, target.dtype) == ("softmax", "32x40", "float32")
    assert target.default == (64, 48) and target.fixed_bn
    assert target.candidates == [(2, 48), (4, 48), (8, 48), (16, 48), (32, 48)]
    result = tune_tile(target, strategy, timeout=60, max_spread=None)  # a busy machine too
    timed = [t.tile for t in result.trials if t.median_s is not None]
    assert len(timed) == {"exhaustive": 6, "random": 6, "model": 5}[strategy]
    assert result.recorded and result.best in target.candidates
    record = knowledge.load(knowledge.TILE, KEY)
    assert record["tile"] == list(result.best) and record["strategy"] == strategy
    assert len(record["trials"]) == 6 and record["default"] == [64, 48]
    # the op compiles with it from now on
    assert reduce.row_tile("softmax", 24, 40, torch.float32, 4096, True) == result.best


def test_wrong_and_failing_candidates_are_rejected_never_recorded():
    target = _slow_default(op_target("softmax", SHAPE))
    # a 16-wide tile leaves most of each 40-long row unwritten: a wrong result
    result = tune_tile(target, "exhaustive", timeout=60, candidates=[(4, 16), (8, 48)],
                       max_spread=None)
    wrong = next(t for t in result.trials if t.tile == (4, 16))
    assert wrong.error and wrong.median_s is None
    assert result.best == (8, 48) and knowledge.load(knowledge.TILE, KEY)["tile"] == [8, 48]

    run = target.run

    def failing(tile):
        if tile == (8, 48):
            raise TuneError("no such tile")
        return run(tile)
    target.run = failing
    result = tune_tile(target, "exhaustive", timeout=60, candidates=[(8, 48)])
    assert not result.recorded and "TuneError: no such tile" in result.trials[1].error
    assert "computed right" in result.note


def test_nothing_is_recorded_when_timings_stall():
    target = _slow_default(op_target("softmax", SHAPE))
    run, calls = target.run, []

    def stalling(tile):  # every other run of (8, 48) stalls, as on an overloaded machine
        calls.append(tile)
        if tile == (8, 48) and len(calls) % 2:
            time.sleep(0.1)
        return run(tile)
    target.run = stalling
    result = tune_tile(target, "exhaustive", timeout=60, candidates=[(8, 48), (16, 48)])
    assert not result.recorded and result.noise > 2 and "busy" in result.note
    assert knowledge.load(knowledge.TILE, KEY) is None


def test_search_refuses_bad_arguments():
    target = op_target("softmax", SHAPE)
    with pytest.raises(TuneError, match="unknown strategy"):
        tune_tile(target, "genetic")
    with pytest.raises(TuneError, match="timeout"):
        tune_tile(target, timeout=0)
    with pytest.raises(TuneError, match="no tunable tile"):
        op_target("matmul", SHAPE)
    with pytest.raises(TuneError, match="shape spec"):
        tessera.tools.tuning.parse_spec("24xforty")


def _grids(monkeypatch, module):
    """The grids of the launches `module` makes from now on."""
    grids = []
    real = module.launch
    monkeypatch.setattr(module, "launch", lambda s, grid, *a: (grids.append(grid),
                                                                 real(s, grid, *a)))
    return grids


def test_a_record_changes_the_tile_an_op_launches_with(monkeypatch):
    x = torch.randn(SHAPE)
    softmax = registry.get("softmax").impl  # what graphs call (no native fast path)
    grids = _grids(monkeypatch, reduce)
    softmax(x, -1)
    assert grids[-1][0] == 1  # the default: 64 rows per program
    knowledge.store(knowledge.TILE, KEY, {"tile": [8, 48]})
    torch.testing.assert_close(softmax(x, -1), torch.softmax(x, -1))
    assert grids[-1][0] == 3  # 24 rows, 8 per program
    # a record that would cut the rows is ignored, with one warning
    knowledge.store(knowledge.TILE, KEY, {"tile": [8, 32]})
    with pytest.warns(RuntimeWarning, match="not 48 wide"):
        softmax(x, -1)
    assert grids[-1][0] == 1


def test_a_tuned_width_stays_off_the_native_fast_path(monkeypatch):
    """The C++ fast path knows only default tiles, one plan per default width: no plan of
    that width is given to it once any length of that width is tuned."""
    from tessera.ops import _fastpath
    given = []
    monkeypatch.setattr(_fastpath, "add_plan", lambda name, *a, **k: given.append(name))
    softmax = registry.get("softmax").impl
    x = torch.randn(24, 200)
    softmax(x, -1)  # an untuned width: its plan is given
    assert given == ["softmax"]
    bn = reduce._row_tile(36, 1024)[1]
    knowledge.store(knowledge.TILE, knowledge.tile_key("softmax", "32x36", "float32"),
                    {"tile": [8, bn]})
    knowledge.reload()
    for cols in (36, 40):  # the tuned length, and another of the same default width
        assert not reduce.native_rows("softmax", cols, torch.float32,
                                      reduce._row_tile(cols, 1024), 1024)
        torch.testing.assert_close(softmax(x[:, :cols], -1), torch.softmax(x[:, :cols], -1))
    assert given == ["softmax"]
    assert reduce.native_rows("softmax", 200, torch.float32, reduce._row_tile(200, 1024), 1024)


class _Model(torch.nn.Module):
    def forward(self, x):
        y = x * 2.0 + 1.0
        return y - y.amax(-1, keepdim=True), torch.relu(x) * 3.0


@pytest.fixture(scope="module")
def fused_nodes(module_cache):
    """The fused row group and pointwise group of a compiled model, and its input."""
    x = torch.randn(SHAPE)
    model = tessera.compile(_Model(), (x,))
    nodes = [n for n in tessera.graph.compiled()[-1].graph.nodes if n.kind == "fused"]
    rows = next(n for n in nodes if n.fn.r)
    flat = next(n for n in nodes if not n.fn.r)
    return model, rows, flat, x


def test_a_record_changes_the_tile_a_fused_kernel_launches_with(monkeypatch, fused_nodes):
    _, rows, flat, x = fused_nodes
    grids = _grids(monkeypatch, fusion)
    want = rows.fn(x)
    assert grids[-1][1] == 1  # default: 64 rows per program
    knowledge.store(knowledge.TILE, f"{rows.fn.tune_key}|32x40|float32", {"tile": [8, 48]})
    torch.testing.assert_close(rows.fn(x), want)
    assert grids[-1][1] == 3
    flat.fn(x)
    assert grids[-1][0] == 1  # 960 elements, default 2048 per program
    knowledge.store(knowledge.TILE, f"{flat.fn.tune_key}|960|float32", {"tile": [1, 256]})
    torch.testing.assert_close(flat.fn(x), torch.relu(x) * 3.0)
    assert grids[-1][0] == 4


def test_tune_graph_tunes_the_generated_kernels_of_a_script(tmp_path):
    script = tmp_path / "model.py"
    script.write_text(
        "import sys, torch\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return torch.softmax(x * float(sys.argv[1]), -1)\n"
        "model = torch.compile(M(), backend='tessera')\n"
        "model(torch.randn(24, 72))\n")
    results, skipped = tessera.tools.tuning.tune_graph(script, ["0.5"], "model", timeout=20)
    assert skipped == [] and results
    labels = [r.target.label for r in results]  # the script's graph only
    assert all("24x72:float32" in label for label in labels), labels
    for r in results:
        assert r.best in [r.target.default, *r.target.candidates]
        assert all(t.error is None for t in r.trials)
    with pytest.raises(TuneError, match="no Python script"):
        tessera.tools.tuning.tune_graph(tmp_path / "missing.py")


def _some_records():
    knowledge.store(knowledge.TILE, KEY, {"tile": [8, 48], "speedup": 1.5})
    knowledge.store("autotune", "m.k|(('torch.float32', (8,)),)",
                    {"source": "abc", "configs": ["Config(B=8)"], "best": {"B": 8},
                     "timings": [[{"B": 8}, 1e-5]]})


def test_export_clear_import_round_trip(tmp_path):
    _some_records()
    before = knowledge.records()
    assert export_records(tmp_path / "k.json") == 2
    default_cache().clear()
    knowledge.reload()
    assert knowledge.records() == []
    assert import_records(tmp_path / "k.json") == 2
    assert knowledge.records() == before
    assert reduce.row_tile("softmax", 24, 40, torch.float32, 4096, True) == (8, 48)


def _edit(path, change):
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_another_machines_file_is_refused_or_forced_when_isa_and_cores_match(tmp_path):
    _some_records()
    path = tmp_path / "k.json"
    export_records(path)
    default_cache().clear()
    _edit(path, lambda d: d["machine"].update(cpu="Some Other CPU"))
    with pytest.raises(ShareError, match=r"another machine.*differs in cpu"):
        import_records(path)
    assert knowledge.records() == []
    assert import_records(path, force=True) == 2
    assert all(r["value"]["imported_from"] == "Some Other CPU" for r in knowledge.records())
    _edit(path, lambda d: d["machine"].update(cores=d["machine"]["cores"] + 1))
    with pytest.raises(ShareError, match="--force is refused too"):
        import_records(path, force=True)
    result = CliRunner().invoke(app, ["tune", "import", str(path)])
    assert isinstance(result.exception, ShareError) and knowledge.records() != []


def test_corrupted_files_import_nothing(tmp_path):
    _some_records()
    path = tmp_path / "k.json"
    export_records(path)
    good = path.read_text()
    default_cache().clear()
    path.write_text(good[:len(good) // 2])
    with pytest.raises(ShareError, match="not JSON"):
        import_records(path)
    path.write_text(good)
    _edit(path, lambda d: d["records"][0]["value"].update(tile=[8, 64]))
    with pytest.raises(ShareError, match="SHA-256"):
        import_records(path)
    path.write_text(good)
    _edit(path, lambda d: d.update(records=[*d["records"], {
        "kind": "tile", "key": "x|1|float32", "recorded_at": "now", "value": {"tile": [0, 1]}}]))
    _edit(path, lambda d: d.update(sha256=_digest(d["records"])))
    with pytest.raises(ShareError, match=r"record 2 .*no valid tile"):
        import_records(path)
    assert knowledge.records() == []


def test_corrupted_tile_record_is_ignored_with_one_warning():
    knowledge.store(knowledge.TILE, KEY, {"tile": [8, 48]})
    entry = default_cache().entry_dir("knowledge", knowledge._cache_key(knowledge.TILE, KEY))
    (entry / "record.json").write_text('{"value": {"tile": [2, 48]}}')
    knowledge.reload()
    with pytest.warns(RuntimeWarning, match="corrupted"):
        assert reduce.row_tile("softmax", 24, 40, torch.float32, 4096, True) == (64, 48)
    knowledge.reload()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reduce.row_tile("softmax", 24, 40, torch.float32, 4096, True) == (64, 48)
        assert knowledge.records() == []


def test_cli_show_export_import(tmp_path):
    _some_records()
    runner = CliRunner()
    shown = runner.invoke(app, ["tune", "show"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "kernel tiles" in shown.output and "8 x 48" in shown.output
    assert "@tl.autotune winners" in shown.output and "B=8" in shown.output
    path = tmp_path / "k.json"
    assert runner.invoke(app, ["tune", "export", str(path)]).exit_code == 0
    default_cache().clear()
    imported = runner.invoke(app, ["tune", "import", str(path)])
    assert imported.exit_code == 0 and "imported 2 records" in imported.output


_WORKER = """
import sys
from tessera.runtime import knowledge
from tessera.tune import import_records
me = sys.argv[1]
for i in range(25):
    knowledge.store("tile", f"w{me}|{i % 5}x40|float32", {"tile": [i % 4 + 1, 48]})
    if i % 5 == 0:
        import_records(sys.argv[2])
"""


@pytest.mark.ranks
def test_concurrent_writers_and_importers_leave_every_record_readable(tmp_path):
    _some_records()
    path = tmp_path / "k.json"
    export_records(path)
    env = {**os.environ, "TESSERA_CACHE_DIR": os.environ["TESSERA_CACHE_DIR"]}
    procs = [subprocess.Popen([sys.executable, "-W", "error::RuntimeWarning", "-c", _WORKER, str(w),
                               str(path)], env=env) for w in range(3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no corrupted record
        records = knowledge.records()
    assert len(records) == 2 + 3 * 5
    for w in range(3):  # each key's last store: i + 20
        for i in range(5):
            assert knowledge.load("tile", f"w{w}|{i}x40|float32")["tile"] == [i % 4 + 1, 48]
    assert knowledge.load(knowledge.TILE, KEY)["tile"] == [8, 48]


@pytest.mark.slow
def test_zoo_bert_kernels_are_tuned_with_every_candidate_correct():
    from tessera.bench import zoo
    before = {id(ex) for ex in tessera.graph.compiled()}
    z = zoo.build("bert", "tiny")
    # static sizes: other tests' compiles of BERT at other shapes in the same worker would
    # make dynamo's automatic-dynamic sizes symbolic here (order-dependent under xdist)
    model = torch.compile(z.model, backend="tessera", dynamic=False)
    with torch.no_grad():
        model(*z.inputs(2, 16))
    mine = [ex for ex in tessera.graph.compiled() if id(ex) not in before]
    targets, skipped = tessera.tools.tuning.graph_targets(mine)
    assert skipped == [] and len(targets) >= 2
    assert any("layer_norm" in t.label for t in targets)
    target = next(t for t in targets if "layer_norm" in t.label)
    result = tune_tile(target, "exhaustive", timeout=20)
    assert all(t.error is None for t in result.trials), result.trials
    assert result.best in [target.default, *target.candidates]
