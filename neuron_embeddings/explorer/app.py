"""The explorer's web app: FastAPI routes rendering server-side HTML (Jinja2 templates, inline SVG).

Pages: `/` overview, `/neuron/{layer}/{neuron}` a neuron (or SAE feature), `/random`, `/search?token=`,
`/importance/{layer}/{neuron}/{slot}` (with `--model`). No JavaScript and no external assets: it works
offline and any browser, headless or not, can drive it.
"""
from __future__ import annotations

import dataclasses
import math
from html import escape
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from neuron_embeddings.core.summary import below_top_rows, layer_table
from neuron_embeddings.explorer.data import Example, ExplorerData, Unavailable, distinct_windows
from neuron_embeddings.explorer.plots import cluster_colour, dendrogram_svg, distribution_svg, histogram_svg

TEMPLATES = Path(__file__).parent / "templates"
SHOWN = 8  # examples shown per cluster; the rest behind "more examples"


# --- small pure helpers -----------------------------------------------------------------------

def show_token(text: str) -> str:
    """Token text made visible: newlines and tabs as symbols (spaces are kept; pages use pre-wrap)."""
    return str(text).replace("\n", "↵").replace("\r", "").replace("\t", "→")


def split_space(text: str) -> tuple[str, str]:
    """(leading spaces, the rest) of a token with visible content, so that the colour and the max
    token's outline cover the word, not the space before it; whitespace-only tokens stay whole."""
    body = text.lstrip(" ")
    return (text[:len(text) - len(body)], body) if body else ("", text)


def num(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def act_style(act: float, scale: float) -> str:
    """Background for an activation: orange with opacity act/scale, blue for negative values."""
    if not math.isfinite(act) or not scale > 0 or act == 0:
        return ""
    a = min(abs(act) / scale, 1.0)
    rgb = "255,140,0" if act > 0 else "60,120,255"
    return f"background:rgba({rgb},{a:.2f})"


def example_html(e: Example, max_act: float, link: str | None = None, source: bool | None = None) -> str:
    """One example: its window of tokens coloured by activation, the max token outlined, each
    token's activation in its title (shown on hover); with `source`, badged with where it comes
    from (the top-k or a stratum)."""
    spans = []
    for t in e.tokens:
        title = f"{num(t.act)}" if math.isfinite(t.act) else "activation not recorded"
        cls = "t max" if t.is_max else "t"
        lead, body = split_space(show_token(t.text))
        spans.append(f'{lead}<span class="{cls}" style="{act_style(t.act, max_act)}" title="{escape(title)}">'
                     f"{escape(body)}</span>")
    badge = '<span class="badge">central</span>' if e.central else ""
    if source:  # across the spectrum: where the example comes from
        badge += (f'<span class="badge source s{e.source}">{"top-k" if e.source == 0 else f"S{e.source}"}</span>')
    if e.copies:  # the same window elsewhere in the corpus: shown once, counted
        badge += (f'<span class="badge copies" title="the same window in {len(e.copies) + 1} examples '
                  f'(slots {escape(", ".join(str(s) for s in sorted([e.slot, *e.copies])))})">×{len(e.copies) + 1}</span>')
    more = f' · <a href="{link}">importance</a>' if link else ""
    return (f'<div class="ex" data-slot="{e.slot}"><span class="meta">{badge}#{e.slot} act {num(e.act)} · '
            f"seq {e.seq}{more}</span> {''.join(spans)}</div>")


def spectrum_context(v, depth: int | None) -> dict:
    """What the neuron page's spectrum section shows at `depth` (None: every source; else only the
    clusters with an example from that source, and only those examples)."""
    if v is None:
        return {}
    shown = []
    for c in v.clusters:
        exs = [e for e in c.examples if depth is None or e.source == depth]
        if exs:
            shown.append({"c": c, "examples": distinct_windows([dataclasses.replace(e, copies=[]) for e in exs])})
    return {"spectrum": v, "depth": depth, "spectrum_clusters": shown,
            "distribution": distribution_svg(v.hist, v.max, v.intervals, v.topk_min)}


# --- the app ----------------------------------------------------------------------------------

class Explorer:
    """The app's state: the store, the optional model, the templates and cached overview."""

    def __init__(self, data: ExplorerData, model=None):
        self.data, self.model = data, model
        self.env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]))
        self.env.filters.update(tok=show_token, num=num, colour=cluster_colour)
        self.cache = None
        if model is not None:
            from neuron_embeddings.explorer.importance import ImportanceCache

            self.cache = ImportanceCache(data.store)
        self._overview: tuple[tuple, str] | None = None  # ((data version, banner), page)

    def page(self, name: str, **ctx) -> str:
        d = self.data
        base = dict(layers=d.layers, unit_word=d.unit_word, unit_title=d.unit_word.capitalize(),
                    store_name=Path(d.url.rstrip("/")).name, nav_layer=None, nav_neuron=None, query=None,
                    banner=d.banner())
        return self.env.get_template(name).render(**{**base, **ctx})

    def overview(self) -> str:
        key = (self.data.version, tuple(self.data.banner()))
        if self._overview is None or self._overview[0] != key:
            self._overview = (key, self._render_overview())
        return self._overview[1]

    def _render_overview(self) -> str:
        d, m = self.data, self.data.metrics
        rows = layer_table(d.layers, m["n_examples"], m["n_clusters"], m["mean_distance"])
        md_max = float(np.nanmax(m["mean_distance"])) if np.isfinite(m["mean_distance"]).any() else 1.0
        d_edges = np.linspace(0, max(1.0, math.ceil(md_max * 10) / 10), 26)
        c_edges = np.arange(0.5, d.k + 1.5)
        if d.has_strata:
            for r, below in zip(rows, below_top_rows(d.below_only, m["n_examples"])):
                r.update(below)
        for i, r in enumerate(rows):
            have = m["n_examples"][i] >= 2
            r["hist_clusters"] = histogram_svg(m["n_clusters"][i][have], c_edges, "clusters per " + d.unit_word, "{:.0f}")
            r["hist_distance"] = histogram_svg(m["mean_distance"][i][have], d_edges, "mean distance",
                                               colour="#55a868")
        tok, _ = d.top_tokens
        most, least = d.ranked(20)

        def describe(layer: int, j: int) -> dict:
            r = d.row_of(layer)
            return {"layer": layer, "neuron": j, "n_clusters": int(m["n_clusters"][r, j]),
                    "mean_distance": float(np.nan_to_num(m["mean_distance"][r, j])),
                    "tokens": [str(d.vocab[t]) for t in tok[r, j, :4] if t >= 0]}

        a = d.attrs
        return self.page("overview.html", layer_rows=rows, most=[describe(*p) for p in most],
                         least=[describe(*p) for p in least], settings=d.settings_table(),
                         model=a.get("model"), dataset=a.get("dataset"), k=d.k, linkage=a.get("linkage"),
                         threshold=a.get("threshold"), n_units=len(d.layers) * d.d_mlp, has_strata=d.has_strata)

    def neuron(self, layer: int, neuron: int, depth: int | None = None) -> str:
        d = self.data
        d.check_neuron(layer, neuron)
        v = d.neuron(layer, neuron)
        sp = d.spectrum(layer, neuron)
        if depth is not None and (sp is None or not 0 <= depth < len(sp.sources)):
            raise KeyError(f"depth {depth}: this {d.unit_word} has no such stratum"
                           + ("" if sp is None else f" (0 = the top-k, 1-{len(sp.sources) - 1} the strata)"))
        link = (lambda e: f"/importance/{layer}/{neuron}/{e.slot}") if self.model is not None else (lambda e: None)
        return self.page("neuron.html", v=v, k=d.k, nav_layer=layer, nav_neuron=neuron, shown=SHOWN,
                         prev=d.step(layer, neuron, -1), next=d.step(layer, neuron, 1),
                         dendrogram=dendrogram_svg(v.linkage, v.leaf_labels, float(d.attrs["threshold"]), v.leaf_names),
                         example=lambda e: example_html(e, v.max_act, link(e)),
                         spectrum_example=lambda e: example_html(e, sp.max, None, source=True),
                         **spectrum_context(sp, depth))

    def importance(self, layer: int, neuron: int, slot: int) -> str:
        d = self.data
        d.check_neuron(layer, neuron)
        v = d.neuron(layer, neuron)
        e = next((x for c in v.clusters for x in c.examples if x.slot == slot),
                 next((x for x in v.unclustered if x.slot == slot), None))
        if e is None:
            raise KeyError(f"example {slot} of layer {layer} {d.unit_word} {neuron} does not exist")
        r = self.cache.get(layer, neuron, slot)
        if r is None:
            row = d.token_rows(np.array([e.seq]))[e.seq]
            lo = e.pos - next(i for i, t in enumerate(e.tokens) if t.is_max)
            positions = [lo + i for i, t in enumerate(e.tokens) if not t.is_max]
            if self.model.causal:  # a causal model's activation at pos depends on earlier tokens only
                positions = [p for p in positions if p < e.pos]
            r = self.model.importance(row, layer, neuron, e.pos, positions)
            self.cache.put(layer, neuron, slot, r)
        drop = dict(zip(r["positions"], r["drop"]))
        scale = max([abs(x) for x in r["drop"]] + [1e-12])
        lo = e.pos - next(i for i, t in enumerate(e.tokens) if t.is_max)
        toks = []
        for i, t in enumerate(e.tokens):
            p = lo + i
            dv = drop.get(p)
            lead, body = split_space(show_token(t.text))
            toks.append({"lead": lead, "body": body, "is_max": t.is_max,
                         "style": act_style(dv, scale) if dv is not None else "",
                         "title": (f"drop {dv:.4g} (activation {r['original']:.4g} -> {r['original'] - dv:.4g})"
                                   if dv is not None else f"the max token: activation {r['original']:.4g}")})
        return self.page("importance.html", layer=layer, neuron=neuron, slot=slot, r=r, tokens=toks,
                         example=example_html(e, v.max_act), nav_layer=layer, nav_neuron=neuron)

    def error(self, message: str) -> str:
        return self.page("error.html", message=message)


def create_app(data: ExplorerData, model=None) -> FastAPI:
    ex = Explorer(data, model)
    app = FastAPI(title="neuron-embeddings explorer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.explorer = ex

    def not_found(e: Exception) -> HTMLResponse:
        return HTMLResponse(ex.error(str(e).strip("'\"")), status_code=404)

    @app.middleware("http")
    async def follow_the_store(request: Request, call_next):
        data.refresh()  # a live store: drop what was cached when its markers changed
        return await call_next(request)

    @app.exception_handler(Unavailable)
    def unavailable(request: Request, e: Unavailable) -> HTMLResponse:
        return HTMLResponse(ex.error(str(e)), status_code=e.status)

    @app.get("/", response_class=HTMLResponse)
    def overview() -> str:
        return ex.overview()

    @app.get("/neuron")
    def goto(layer: int, neuron: int):
        return RedirectResponse(f"/neuron/{layer}/{neuron}", status_code=303)

    @app.get("/neuron/{layer}/{neuron}", response_class=HTMLResponse)
    def neuron(layer: int, neuron: int, depth: int | None = None):
        try:
            return ex.neuron(layer, neuron, depth)
        except KeyError as e:
            return not_found(e)

    @app.get("/random")
    def random_neuron():
        layer, j = data.random_neuron()
        return RedirectResponse(f"/neuron/{layer}/{j}", status_code=303)

    @app.get("/search", response_class=HTMLResponse)
    def search(token: str = "", limit: int = 200) -> str:
        tokens, hits = data.search(token, limit) if token.strip() else ([], [])
        return ex.page("search.html", query=token, tokens=tokens, hits=hits, limit=limit)

    @app.get("/importance/{layer}/{neuron}/{slot}", response_class=HTMLResponse)
    def importance(layer: int, neuron: int, slot: int, request: Request):
        if model is None:
            return HTMLResponse(ex.error("token importance needs the model: start the explorer with --model"),
                                status_code=404)
        try:
            return ex.importance(layer, neuron, slot)
        except KeyError as e:
            return not_found(e)

    return app


def serve(store: str, host: str = "127.0.0.1", port: int = 8501, model: str | None = None,
          device: str = "auto") -> None:
    """Open the store, load the model if given, and serve until interrupted."""
    import socket

    import uvicorn

    from neuron_embeddings.core.errors import UserError

    data = ExplorerData(store)
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from e
    imp = None
    if model:
        from neuron_embeddings.explorer.importance import ImportanceModel

        print(f"loading {model} for token importance ...", flush=True)
        imp = ImportanceModel(model, data.attrs, device)
    app = create_app(data, imp)
    print(f"explorer for {store}: open http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
