"""Stores of schema version 1 (before d_embed, gated MLPs and the BOS / special-token attributes)
stay readable: status, the explorer, the summary and a resumed run accept them."""
from __future__ import annotations

import pytest
import zarr

from neuron_embeddings.core.errors import UserError

from neuron_embeddings.explorer.data import ExplorerData
from neuron_embeddings.storage.store import Store
from neuron_embeddings.tasks.registry import run_status
from neuron_embeddings.tasks.summarise import summarise_store
from tests.helpers import contract_arrays, options, run_stages, tree_digest

V2_ONLY = ("d_embed", "embedding", "gated", "prepend_bos", "excluded_token_ids")


def _as_version_1(out: str) -> None:
    """What version 1 wrote: the same arrays, without the version-2 root attributes, without
    dimension names and without the coordinate arrays `layer` and `offset`."""
    import json
    import shutil
    from pathlib import Path

    from neuron_embeddings.storage import schema

    g = zarr.open_group(out, mode="r+")
    attrs = {k: v for k, v in g.attrs.items() if k not in V2_ONLY}
    attrs["schema_version"] = "neuron-embeddings/1"
    g.attrs.clear()
    g.attrs.update(attrs)
    for spec in (schema.LAYER, schema.OFFSET):
        shutil.rmtree(Path(out, spec.path))
    for meta in Path(out).rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        if doc.pop("dimension_names", None) is not None:
            meta.write_text(json.dumps(doc))


def test_version_1_store_is_read_and_resumed(tiny_gpt2, tmp_path):
    out = str(tmp_path / "v1.zarr")
    opts = options(tiny_gpt2, layers="1", prepend_bos=False, exclude_special_tokens=False)  # what version 1 did
    run_stages(out, **opts)
    want = contract_arrays(out)
    _as_version_1(out)
    assert Store(out).attrs["schema_version"] == "neuron-embeddings/1" and not Store(out).gated
    assert zarr.open_group(out, mode="r")["tokens"].metadata.dimension_names is None
    st = run_status(out)
    assert st.failed == 0 and st.pending == 0 and st.complete > 0
    data = ExplorerData(out)
    view = data.neuron(1, 3)
    assert view is not None and data.metrics["n_clusters"].shape == want["metrics/n_clusters"].shape
    assert [r["layer"] for r in summarise_store(out)["layers"]] == [1]
    before = tree_digest(out)
    run_stages(out, **opts)  # the resume check accepts it; every shard is complete: nothing changes
    assert tree_digest(out) == before
    with pytest.raises(UserError, match="prepend_bos: False in the store, True asked"):
        run_stages(out, **options(tiny_gpt2, layers="1"))  # today's defaults are other settings: refused
    assert tree_digest(out) == before
