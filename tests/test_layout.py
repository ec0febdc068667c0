"""The architecture's contracts: import direction, the one build path, loading for inference without training
settings, the EMA warm-up in the trainer, and sampling settings read from one place."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from transfusion import config
from transfusion.decoding import sampling_args

from train_helpers import write_micro_config

SRC = Path(__file__).resolve().parent.parent / "src"
ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Project module -> project modules it imports anywhere in the file (function-local imports included).
    `from a.b import c` counts as importing a.b.c when that is a module, else a.b."""
    files = {_module_name(p): p for p in (SRC / "transfusion").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_no_import_cycle_among_project_modules() -> None:
    graph = import_graph()
    cycles = [m for m in graph if m in _reach(graph, m)]
    assert not cycles, f"modules on an import cycle: {sorted(cycles)}"


def test_model_imports_architecture_only() -> None:
    graph = import_graph()
    allowed = {"transfusion.config", "transfusion.images"}
    for mod, deps in graph.items():
        if _under(mod, "transfusion.model"):
            bad = {d for d in deps if not _under(d, "transfusion.model") and d not in allowed}
            assert not bad, f"{mod} imports {sorted(bad)}: model/ holds architecture only"


@pytest.mark.parametrize("package,forbidden", [
    ("transfusion.checkpoint", ["transfusion.train", "transfusion.parallel", "transfusion.evaluate", "transfusion.cli"]),
    ("transfusion.evaluate", ["transfusion.train", "transfusion.parallel"]),
    ("transfusion.decoding", ["transfusion.train", "transfusion.parallel", "transfusion.checkpoint"]),
    ("transfusion.inference", ["transfusion.train", "transfusion.parallel"]),
    ("transfusion.editing", ["transfusion.train", "transfusion.parallel", "transfusion.checkpoint"]),
    ("transfusion.serve", ["transfusion.train", "transfusion.parallel", "transfusion.cli"]),
    ("transfusion.data", ["transfusion.model", "transfusion.train", "transfusion.backends"]),
    ("transfusion.backends", ["transfusion.train", "transfusion.parallel", "transfusion.checkpoint"]),
])
def test_import_direction(package: str, forbidden: list[str]) -> None:
    """Data flows one way: nothing that loads, evaluates or samples reaches the trainer, even transitively."""
    graph = import_graph()
    for mod in graph:
        if _under(mod, package):
            reached = _reach(graph, mod)
            bad = sorted(r for r in reached for f in forbidden if _under(r, f))
            assert not bad, f"{mod} reaches {bad}"


def test_one_model_constructor() -> None:
    """Only model/build.py constructs our Transfusion(...); the peer's own class (imported from
    transfusion_pytorch, benchmarks/peer.py and time_to_quality.py) does not count."""
    calls = []
    for path in [*(SRC / "transfusion").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        tree = ast.parse(path.read_text())
        peer = any(isinstance(n, ast.ImportFrom) and n.module == "transfusion_pytorch"
                   and any(a.name == "Transfusion" for a in n.names) for n in ast.walk(tree))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Transfusion" and not peer:
                calls.append(str(path.relative_to(ROOT)))
    assert set(calls) <= {"src/transfusion/model/build.py"}, calls
    for script in (ROOT / "benchmarks").glob("*.sh"):  # Python embedded in shell scripts
        assert "Transfusion(" not in script.read_text(), script


def test_paper_7b_config_samples_as_the_paper() -> None:
    """[diffusion] is the one place of the sampling settings: the 7B config's CFG 5 and DDPM 250 are used."""
    cfg = config.load(ROOT / "configs" / "paper" / "7B.toml")
    assert sampling_args(cfg.diffusion) == {"steps": 250, "cfg_scale": 5.0, "sampler": "ddpm"}
    assert sampling_args(config.Config().diffusion) == {"steps": 250, "cfg_scale": 3.0, "sampler": "ddpm"}


def test_legacy_keys_load_as_they_were_honoured(tmp_path) -> None:
    """A checkpoint config from before the move: [eval] sampling keys (the honoured ones) win over [diffusion]'s
    (never read then), and train.threads becomes runtime.threads."""
    old = tmp_path / "old.toml"
    old.write_text('[diffusion]\nsample_steps = 250\nsampler = "ddpm"\n[train]\nthreads = 2\n'
                   '[eval]\nn_samples = 160\nsample_steps = 50\nsampler = "ddim"\ncfg_scale = 3.0\n')
    cfg = config.load(old)
    assert sampling_args(cfg.diffusion) == {"steps": 50, "cfg_scale": 3.0, "sampler": "ddim"}
    assert cfg.runtime.threads == 2 and cfg.eval.n_samples == 160
    with pytest.raises(config.ConfigError, match="sample_steps=0"):
        config.load(None, ["diffusion.sample_steps=0"])


def test_ema_warms_up_with_the_trainer_step(tmp_path) -> None:
    """After one optimiser step at decay 0.999 the EMA is the warm-up mix min(0.999, (1+0)/(10+0)) = 0.1 of the
    initial weights and 0.9 of the updated ones (a constant 0.999 would leave it at the initial weights)."""
    from transfusion.checkpoint import dcp
    from transfusion.checkpoint.layout import resolve
    from transfusion.model.build import build_model
    from transfusion.train import train

    cfg = config.load(write_micro_config(tmp_path / "c.toml", steps=1, ckpt_every=1), ["train.ema=0.999"])
    train(cfg, tmp_path / "run", progress=False)
    init = dict(build_model(cfg.model, seed=cfg.train.seed).named_parameters())
    updated = build_model(cfg.model)
    ema = dcp.load_into_plain(resolve(tmp_path / "run"), updated)
    moved = 0
    for name, p in updated.named_parameters():
        expected = 0.1 * init[name].detach() + 0.9 * p.detach()
        assert torch.allclose(ema[name], expected, atol=1e-6), name
        moved += int(not torch.equal(p, init[name]))
    assert moved > 10  # the step changed the weights, so the test can tell the decays apart


def test_loading_for_inference_applies_no_training_setting(tmp_path, monkeypatch) -> None:
    """A checkpoint of a run with compile and activation checkpointing on loads without either, leaves the
    global RNG as it was, and comes back in eval mode with the inference converters only."""
    from transfusion.checkpoint.export import save_export
    from transfusion.inference import load
    from transfusion.model.build import build_model

    cfg = config.load(None, ["model.preset=micro", "train.compile=true", "train.activation_checkpointing=true"])
    save_export(tmp_path / "run", 1, build_model(cfg.model), cfg)

    def refuse(*a, **kw):
        raise AssertionError("training setting applied while loading for inference")

    monkeypatch.setattr(torch, "compile", refuse)
    monkeypatch.setattr(torch.nn.Module, "compile", refuse)
    monkeypatch.setattr("transfusion.parallel.parallelize.apply_ac", refuse)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    m = load(tmp_path / "run")
    assert torch.equal(torch.get_rng_state(), before)
    assert not m.model.training and m.config.train.compile
    assert set(m.converters) <= {"cpu_math_attention", "onednn_packed"}
    for block in m.model.layers:  # no activation-checkpoint wrapper, not compiled
        fwd = block.__dict__.get("forward")
        assert fwd is None or fwd.__module__ == "transfusion.backends.cpu.onednn"
        assert getattr(block, "_compiled_call_impl", None) is None


def test_building_a_model_does_not_touch_the_global_rng() -> None:
    from transfusion.model.build import build_model

    cfg = config.ModelConfig.from_name("micro")
    torch.manual_seed(7)
    before = torch.get_rng_state()
    a, b = build_model(cfg, seed=3), build_model(cfg, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert build_model(cfg, device="meta").tok_emb.weight.is_meta


def test_public_api_names_are_the_functions() -> None:
    """`import transfusion as tf` exposes the library; no API name shadows a submodule."""
    import transfusion as tf
    import transfusion.decoding
    import transfusion.train.step

    assert tf.generate is transfusion.decoding.generate and tf.train is transfusion.train
    assert not set(tf.__all__) & {p.stem for p in (SRC / "transfusion").iterdir()}
    model = tf.build_model(tf.ModelConfig.from_name("micro"))
    assert isinstance(model, tf.Transfusion) and set(tf.__all__) <= set(dir(tf))
