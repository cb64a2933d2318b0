"""One settings object owns every run default: the flow's parameters, the CLI's options and
prefect.yaml's deployments are checked against core.settings here."""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from neuron_embeddings.cli import build_parser, main
from neuron_embeddings.core.errors import UserError
from neuron_embeddings.core.models import BUILTIN_MINILM
from neuron_embeddings.core.settings import DEMO, ExecSettings, RunSettings, default
from neuron_embeddings.flows.run import neuron_embeddings_run
from neuron_embeddings.flows.sae import sae_flow

ROOT = Path(__file__).resolve().parents[2]
DERIVED = {"out", "layers", "scan_blocks"}  # no fixed default: required, "all layers", "one block per worker"
OPTIONS = ({f.name for f in dataclasses.fields(RunSettings)} - {"excluded_token_ids"}  # resolved from the next
           | {"exclude_special_tokens"} | {f.name for f in dataclasses.fields(ExecSettings)})


def test_flow_parameters_are_the_settings_with_their_defaults():
    params = inspect.signature(neuron_embeddings_run.fn).parameters
    assert set(params) == OPTIONS | {"out"}  # every option a parameter, nothing else (no test switches)
    for name, p in params.items():
        if name not in DERIVED:
            assert p.default == default(name), name


def test_cli_run_options_take_the_settings_defaults():
    a = build_parser().parse_args(["run", "--dataset", "x.txt", "--out", "o.zarr"])
    for name in OPTIONS - DERIVED - {"dataset", "sae"}:
        assert getattr(a, name) == default(name), name
    assert a.layers is None and a.scan_blocks is None
    assert not any("fault" in k for k in vars(a))


def _deployments() -> list[dict]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def test_prefect_yaml_parameters_are_valid_settings():
    runs = [d for d in _deployments() if d["entrypoint"] == "flows/run.py:neuron_embeddings_run"]
    saes = [d for d in _deployments() if d["entrypoint"] == "flows/sae.py:sae_flow"]
    assert runs and saes and len(runs) + len(saes) == len(_deployments())
    run_params = set(inspect.signature(neuron_embeddings_run.fn).parameters)
    for d in runs:
        p = d["parameters"]
        assert set(p) <= run_params, (d["name"], set(p) - run_params)
        store = {k: v for k, v in p.items() if k in {f.name for f in dataclasses.fields(RunSettings)}
                 and k not in ("layers", "prepend_bos")}
        RunSettings(**{"model": default("model"), "dataset": default("dataset"), **store, "layers": (0,)})
        ExecSettings(**{k: v for k, v in p.items() if k in {f.name for f in dataclasses.fields(ExecSettings)}})
    sae_params = set(inspect.signature(sae_flow.fn).parameters)
    for d in saes:
        assert set(d["parameters"]) <= sae_params, (d["name"], set(d["parameters"]) - sae_params)


def test_the_demo_deployment_is_the_demo():
    demo = next(d for d in _deployments() if d["name"] == "demo")["parameters"]
    assert {k: v for k, v in demo.items() if k != "out"} == DEMO and DEMO["model"] == BUILTIN_MINILM
    a = build_parser().parse_args(["demo"])
    assert a.n_sequences == DEMO["n_sequences"]


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("batch_size", -4), ("workers", 0),
                                          ("task_retries", -1), ("device", "tpu")])
def test_exec_settings_refuse_bad_values(field, value):
    with pytest.raises(UserError, match=f"--{field.replace('_', '-')}"):
        ExecSettings(**{field: value})


def test_cli_refuses_a_bad_batch_size_before_creating_the_store(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    rc = main(["run", "--model", str(tmp_path / "no-model"), "--dataset", "builtin:python-docs", "--out", str(out),
               "--batch-size", "-4"])
    assert rc == 2 and "--batch-size -4" in capsys.readouterr().err
    assert not out.exists()


def test_sae_options_take_the_sae_settings_defaults():
    from neuron_embeddings.core.sae import SAETrainSettings

    sae = {f.name: f.default for f in dataclasses.fields(SAETrainSettings)}
    a = build_parser().parse_args(["sae", "train", "--dataset", "x.txt", "--layer", "0", "--out", "d"])
    params = inspect.signature(sae_flow.fn).parameters
    for name, value in sae.items():
        assert getattr(a, name) == value, name
        if name in params and name != "ln_coef":  # the flow compares with L_N on: its own default
            assert params[name].default == value, name
    for name in ("k", "selection", "linkage", "threshold", "shard_size", "device", "workers"):
        assert params[name].default == default(name), name
