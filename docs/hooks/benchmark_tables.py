"""The benchmark tables of the documentation, generated from benchmarks/results/*.json (what ``pytest benchmarks/``
writes, one file per benchmark file and device).

- In a page, ``<!-- benchmark-table: crf-fps -->`` becomes the table of every results file of that benchmark file
  (``benchmarks/results/<device>-crf-fps.json``), each under its device, each row with its date (an MkDocs hook:
  mkdocs.yml ``hooks:``).
- ``headline_table()`` is README.md's table (between ``<!-- headline table -->`` markers; tests/test_layout.py keeps
  them equal): the dense CRF against pydensecrf2 and ours forward + backward, on the CPU.
- ``models_table()`` is README.md's model table (between ``<!-- models table -->`` markers, kept equal the same
  way): every registered model, the published metrics of its weights (their ``meta``), and the CPU images/s of
  ours, plain torch and the peer (torchvision's or smp's) from ``benchmarks/test_models_fps.py``'s CPU results.
- ``sweep_table()`` is README.md's CPU sweep table (between ``<!-- sweep table -->`` markers, kept equal the same
  way): the dense CRF against pydensecrf2 at every label count and size of benchmarks/test_crf_sweep.py, one thread.
- ``python docs/hooks/benchmark_tables.py [SLUG]`` prints the tables (all, or one benchmark file's).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"<!-- benchmark-table: ([a-z0-9-]+) -->")
SLUGS = ("crf-fps", "crf-sweep", "crf-grad", "crf-contention", "atrous-conv", "aspp", "models-fps")


def results(slug: str) -> list[tuple[Path, dict]]:
    """(path, document) of every results file of one benchmark file, CPU devices first."""
    found = []
    for path in sorted(RESULTS.glob(f"*-{slug}.json")):
        device_part = path.name[: -len(f"-{slug}.json")]
        if any(path.name.endswith(f"-{other}.json") and len(other) > len(slug) for other in SLUGS):
            continue  # e.g. "*-crf-fps.json" must not take "*-x-crf-fps.json" of a longer slug
        found.append((device_part, path, json.loads(path.read_text())))
    found.sort(key=lambda t: (not t[0].startswith("cpu"), t[0]))
    return [(p, d) for _, p, d in found]


def _ms(value) -> str:
    if value is None:
        return ""
    return f"{value:.3f} ms" if value < 10 else f"{value:.1f} ms"


def _x(value) -> str:
    return "" if value is None else f"{value:.2f}x"


def _target(row: dict) -> str:
    text = row.get("target") or (f"<= {row['target_ms']:g} ms" if row.get("target_ms") else "")
    met = row.get("meets_target")
    if met is None:
        met = row.get("extra", {}).get("meets_target")
    if not text and row.get("extra", {}).get("target_backward_over_forward"):
        text = f"bwd/fwd <= {row['extra']['target_backward_over_forward']:g}"
    if not text:
        return ""
    return f"{text}: {'met' if met else 'missed'}" if met is not None else text


EXTRA_COLUMNS = (  # optional columns, shown when a file's rows have them
    ("backward_over_forward", "bwd / fwd", lambda v: f"{v:.2f}"),
    ("peak_mb", "peak memory", lambda v: f"{v:.0f} MB"),
    ("two_over_one", "2 thr / 1 thr", lambda v: f"{v:.2f}"),
)


def file_table(slug: str) -> str:
    """The tables of one benchmark file: one per device, with the date each row was measured."""
    docs = results(slug)
    if not docs:
        return f"*No results yet: `pytest benchmarks/test_{slug.replace('-', '_')}.py` writes them.*\n"
    out = []
    for path, doc in docs:
        rows = [r for r in doc["rows"] if r.get("median_ms")]
        extras = [c for c in EXTRA_COLUMNS if any(r.get("extra", {}).get(c[0]) is not None for r in rows)]
        out.append(f"**{doc['device']}** (`benchmarks/results/{path.name}`)\n")
        head = ["case", "implementation", "median", "best", "fps", "speed-up"] + [c[1] for c in extras] + [
            "target", "measured"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join("---" if h in ("case", "implementation", "target") else "---:" for h in head) + "|")
        for r in rows:
            cells = [r["group"], r["impl"], _ms(r["median_ms"]), _ms(r.get("best_ms")),
                     "" if r.get("fps") is None else f"{r['fps']:.2f}", _x(r.get("speedup_vs_peer"))]
            cells += ["" if r.get("extra", {}).get(k) is None else fmt(r["extra"][k]) for k, _, fmt in extras]
            cells += [_target(r), r.get("date") or doc.get("date", "")]
            out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def headline_table() -> str:
    """README's table: per CPU results file of the dense CRF, ours against pydensecrf2 (forward) and our forward +
    backward (Potts, 2 threads), from the JSON."""
    lines = ["| measurement (512x512 photo, 21 labels, 10 iterations) | implementation | median | vs the peer | "
             "target | measured |", "|---|---|---:|---:|---|---|"]
    for slug, keep in (("crf-fps", lambda r: "default" in r["group"]),
                       ("crf-grad", lambda r: r["group"].endswith("2thr") and " potts " in r["group"])):
        for path, doc in results(slug):
            if not path.name.startswith("cpu-"):
                continue
            for r in doc["rows"]:
                if r.get("median_ms") and keep(r):
                    what = r["group"] if slug == "crf-fps" else r["group"].replace("crf 512x512 L=21 ", "crf ")
                    lines.append(f"| {what} | {r['impl']} | {_ms(r['median_ms'])} | {_x(r.get('speedup_vs_peer'))} "
                                 f"| {_target(r)} | {r.get('date') or doc.get('date', '')} |")
    device = next((doc["device"] for _, doc in results("crf-fps") if doc["device"]), "")
    return "\n".join(lines) + f"\n\nDevice: {device}. Every row: `benchmarks/results/*.json`; all tables: " \
                              "[docs/benchmarks.md](docs/benchmarks.md).\n"


def _published(name: str) -> str:
    """The published numbers of a model's weights, from their ``meta`` (``metrics``; ``published`` for the v3+
    backbone entries, which carry the paper's numbers)."""
    from deeplab_fast import models

    found = []
    for w in models.get_model_weights(name):  # the members, aliases (DEFAULT) once
        member = w._name_
        for dataset, m in (w.meta.get("metrics") or {}).items():
            text = f"{m['miou']:g}" + (f" ({m['miou_crf']:g} with the CRF)" if m.get("miou_crf") else "")
            found.append(f"{text} mIoU, {dataset} (`{member}`)")
        for dataset, m in (w.meta.get("published") or {}).items():
            if isinstance(m, dict):
                found.append(f"{m['miou']:g} mIoU, {dataset} (published; no weights)")
    return "; ".join(dict.fromkeys(found)) or "none registered"


def models_table() -> str:
    """README's table of the registered models: published metrics and CPU images/s at 513x513, batch 1 (ours =
    ``optimize(model)``, plain torch, the peer), from the CPU results of ``benchmarks/test_models_fps.py``."""
    from deeplab_fast import models

    rows, device = {}, ""
    for path, doc in results("models-fps"):
        if not path.name.startswith("cpu-"):
            continue
        device = device or doc["device"]
        for r in doc["rows"]:
            if r.get("fps") and r["group"].endswith("batch 1"):
                rows[(r["group"].split()[1], r["group"].split()[2], r["impl"])] = dict(r, date=r.get("date")
                                                                                       or doc.get("date", ""))
    lines = ["| model | published (weights' meta) | ours, img/s | plain torch | peer, img/s | measured |",
             "|---|---|---:|---:|---|---|"]

    def fps(name, size, impl):
        r = rows.get((name, size, impl))
        return f"{r['fps']:.2f}" if r else ""

    for name in models.list_models():
        size = "513x513"
        peers = [f"{fps(name, size, 'torchvision')} torchvision" if fps(name, size, "torchvision") else ""]
        smp = [(s, fps(name, s, "segmentation_models_pytorch")) for s in ("512x512",)]
        peers += [f"{v} smp ({fps(name, s, 'deeplab_fast smp flavor (optimize)')} ours, smp flavor, {s})"
                  for s, v in smp if v]
        measured = sorted({r.get("date", "") for k, r in rows.items() if k[0] == name})
        lines.append(f"| `{name}` | {_published(name)} | {fps(name, size, 'deeplab_fast (optimize)')} | "
                     f"{fps(name, size, 'plain torch')} | {'; '.join(p for p in peers if p)} | "
                     f"{', '.join(measured)} |")
    return "\n".join(lines) + (f"\n\nDevice: {device}; 513x513, batch 1, float32 "
                               "(`benchmarks/results/*-models-fps.json`).\n")


def sweep_table() -> str:
    """README's CPU sweep table: per case of the CPU results of benchmarks/test_crf_sweep.py, pydensecrf2 and ours
    with one thread (process CPU time, interleaved), the speed-up, ns per pixel x label x iteration, ours with two
    threads (wall clock), the SIMD path and the one-thread target."""
    lines = ["| case (10 iterations) | pydensecrf2 | ours, 1 thr | speed-up | ns / px·label·it | ours, 2 thr | SIMD | "
             "target (1 thr) |", "|---|---:|---:|---:|---:|---:|---|---|"]
    device, dates = "", set()
    for path, doc in results("crf-sweep"):
        if not path.name.startswith("cpu-"):
            continue
        device = device or doc["device"]
        groups: dict = {}
        for r in doc["rows"]:
            if r.get("median_ms"):
                groups.setdefault(r["group"], {})[r["impl"]] = r
        order = sorted(groups, key=lambda g: (_sweep_key(next(iter(groups[g].values())))))
        for g in order:
            rows = groups[g]
            peer = next((r for k, r in rows.items() if not k.startswith("deeplab_fast")), None)
            one = rows.get("deeplab_fast (1 thr)")
            two = rows.get("deeplab_fast (2 thr)")
            if peer is None or one is None:
                continue
            e = one.get("extra", {})
            dates.add(one.get("date") or doc.get("date", ""))
            lines.append(f"| {e['size']}, {e['labels']} labels, {e['kernels']} | {_ms(peer['median_ms'])} | "
                         f"{_ms(one['median_ms'])} | {_x(one.get('speedup_vs_peer'))} | "
                         f"{e['ns_per_pixel_label_iteration']:.1f} | {_ms(two and two['median_ms'])} | "
                         f"{e.get('simd') or ''} | {_target(one)} |")
    when = ", ".join(sorted(d for d in dates if d))
    if not device:
        return "*No results yet: `pytest benchmarks/test_crf_sweep.py --full` writes them.*\n"
    return "\n".join(lines) + f"\n\nDevice: {device}; measured {when}. All rows: `benchmarks/results/*-crf-sweep.json`.\n"


def _sweep_key(row: dict):
    e = row.get("extra", {})
    return (e.get("kernels", ""), int(str(e.get("size", "0x0")).split("x")[0]), e.get("labels", 0))


def on_page_markdown(markdown: str, page=None, config=None, files=None, **kwargs) -> str:
    """MkDocs hook: fills the benchmark-table markers of a page."""
    return MARKER.sub(lambda m: file_table(m.group(1)), markdown)


if __name__ == "__main__":
    for slug in sys.argv[1:] or SLUGS:
        print(f"## {slug}\n\n{file_table(slug)}")
