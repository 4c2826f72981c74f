"""A run's report.html: one page to look at instead of reading metrics.jsonl.

From the top: the title and subtitle, the verdict (the one sentence that matters) and any warnings,
then each prompt's before and after videos side by side, the score table ("mean ± stderr" per
policy), the plots (reward curve, merge sweep) and a small table of facts. Videos and plots are
relative links to the run's own files, so the page works from any copy of the run folder and fetches
nothing from the network; the little inline script only records each video's duration (so a headless
browser can prove the videos decode) and restarts a before/after pair together.

The `report` dict (only "title" is required; anything else that is absent is left out of the page):

    title          str
    subtitle       str
    verdict        str
    warnings       [str, ...]
    samples        [{"prompt": str, "before": path, "after": path}, ...]
    before_label   str (default "before");  after_label  str (default "after")
    scores         [{"policy": str, "in_domain": [mean, stderr], "out_of_domain": [mean, stderr],
                     "note": str}, ...]  (any other key holding [mean, stderr] or a number is a column too)
    score_names    {"in_domain": column heading, "out_of_domain": column heading, ...}
    plots          [{"title": str, "path": path}, ...]
    facts          {name: value, ...}

Paths are relative to the run folder (an absolute path inside it is accepted); a file that is not
there, or lies outside the run folder, is shown as a note instead of a broken player or image.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from urllib.parse import quote

from common.durable import write_bytes_atomic

KEYS = (
    "title",
    "subtitle",
    "verdict",
    "warnings",
    "samples",
    "before_label",
    "after_label",
    "scores",
    "score_names",
    "plots",
    "facts",
)

# Inline and small on purpose: the page must open from a copied run folder with no network.
_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d232a; background: #fafafa;
       max-width: 1100px; margin: 0 auto; padding: 24px 20px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 34px 0 10px; border-bottom: 1px solid #d8dde3; padding-bottom: 4px; }
.subtitle { color: #5b6570; margin: 0 0 18px; }
.verdict { font-size: 18px; font-weight: 600; background: #e9f2fb; border-left: 5px solid #2f6ea8;
           padding: 12px 16px; margin: 16px 0; }
.warning { background: #fff4d6; border-left: 5px solid #d9a400; padding: 8px 14px; margin: 8px 0; }
.missing { color: #8a5a00; font-style: italic; }
.sample { background: #fff; border: 1px solid #e1e5ea; border-radius: 6px; padding: 12px; margin: 0 0 16px; }
.prompt { font-weight: 600; margin: 0 0 8px; }
.prompt button { font: inherit; font-weight: normal; font-size: 13px; margin-left: 10px; cursor: pointer; }
.pair { display: flex; flex-wrap: wrap; gap: 14px; }
.pair figure { margin: 0; }
.pair figcaption, .plot figcaption { color: #5b6570; font-size: 13px; margin-top: 2px; }
/* Toy videos are 16x16 upscaled: nearest-neighbour keeps their pixels sharp instead of a blur. */
video { display: block; width: 400px; max-width: 100%; height: auto; background: #000;
        image-rendering: pixelated; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #d8dde3; padding: 6px 12px; text-align: left; vertical-align: top; }
th { background: #eef1f4; font-weight: 600; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.plots { display: flex; flex-wrap: wrap; gap: 18px; }
.plot { margin: 0; }
.plot img { display: block; max-width: 520px; width: 100%; border: 1px solid #e1e5ea; background: #fff; }
"""

# Durations are written into the DOM (data-duration on each <video>, and #video-durations as JSON in
# page order) because --dump-dom can read the DOM but not JavaScript state: a test in a headless
# browser then sees whether every video's metadata loaded. A decode error is recorded the same way.
_SCRIPT = """
(function () {
  var videos = Array.prototype.slice.call(document.querySelectorAll("video"));
  var out = document.getElementById("video-durations");
  var state = videos.map(function (v) { return {src: v.getAttribute("src"), duration: null, error: null}; });
  function show() { out.textContent = JSON.stringify(state); }
  videos.forEach(function (v, i) {
    function loaded() {
      var d = v.duration;
      v.setAttribute("data-duration", String(d));
      state[i].duration = isFinite(d) ? d : String(d);
      show();
    }
    function failed() {
      var e = v.error;
      state[i].error = e ? e.code + " " + (e.message || "") : "error";
      v.setAttribute("data-error", state[i].error);
      var cap = v.parentNode.querySelector("figcaption");
      if (cap) cap.insertAdjacentHTML("beforeend", ' <span class="missing">(this browser cannot play it)</span>');
      show();
    }
    v.addEventListener("loadedmetadata", loaded);
    v.addEventListener("error", failed);
    // Events that fired before this script ran are not replayed.
    if (v.error) failed(); else if (v.readyState >= 1) loaded();
  });
  show();
  Array.prototype.forEach.call(document.querySelectorAll("button.restart"), function (b) {
    b.addEventListener("click", function () {
      b.closest(".sample").querySelectorAll("video").forEach(function (v) { v.currentTime = 0; v.play(); });
    });
  });
})();
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt_number(x: object) -> str:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _fmt_score(value: object) -> str:
    """[mean, stderr] -> "mean ± stderr" with the stderr to two significant digits and the mean to the
    same decimal place: more digits than the error bar supports would only be noise to read."""
    if value is None:
        return "—"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _fmt_number(value)
    if isinstance(value, list | tuple) and len(value) == 2:
        mean, err = value
        try:
            mean, err = float(mean), float(err)
        except (TypeError, ValueError):
            return _e(value)
        if not math.isfinite(mean):
            return str(mean)
        if not math.isfinite(err) or err <= 0:
            return f"{mean:.4g} ± {err:g}"
        decimals = min(max(1 - math.floor(math.log10(err)), 0), 8)
        return f"{mean:.{decimals}f} ± {err:.{decimals}f}"
    return str(value)


def _link(run_dir: Path, path: object) -> tuple[str | None, str]:
    """(URL relative to the page, or None when the file can't be shown; the path as given, for notes)."""
    shown = str(path)
    p = Path(str(path))
    if p.is_absolute():
        try:
            p = p.relative_to(run_dir.absolute())
        except ValueError:
            try:
                p = p.resolve().relative_to(run_dir.resolve())
            except ValueError:
                return None, f"{shown} (outside the run folder)"
    # Lexically, not with resolve(): a symlink inside the run folder is still the run's own file.
    p = Path(os.path.normpath(p))
    if p.parts[:1] == ("..",):
        return None, f"{shown} (outside the run folder)"
    if not (run_dir / p).is_file():
        return None, f"{shown} (not found)"
    return quote(p.as_posix()), shown


def _video(run_dir: Path, path: object, label: str) -> str:
    url, shown = _link(run_dir, path)
    if url is None:
        body = f'<p class="missing">video {_e(shown)}</p>'
    else:
        # autoplay (muted, so browsers allow it) so the pair is seen moving without a click.
        body = f'<video src="{_e(url)}" controls loop muted playsinline autoplay preload="auto"></video>'
    return f"<figure>{body}<figcaption>{_e(label)}</figcaption></figure>"


def _samples(run_dir: Path, report: dict) -> list[str]:
    samples = report.get("samples") or []
    if not samples:
        return []
    before, after = report.get("before_label") or "before", report.get("after_label") or "after"
    out = [f"<h2>Samples: {_e(before)} | {_e(after)}</h2>"]
    for i, s in enumerate(samples):
        pair = [_video(run_dir, s[k], lab) for k, lab in (("before", before), ("after", after)) if s.get(k)]
        button = '<button class="restart" type="button">restart both</button>' if len(pair) == 2 else ""
        prompt = s.get("prompt")
        prompt_html = f"{i}. {_e(prompt)}" if prompt is not None else f"{i}."
        out.append(
            f'<div class="sample"><p class="prompt">{prompt_html}{button}</p>'
            f'<div class="pair">{"".join(pair)}</div></div>'
        )
    return out


def _scores(report: dict) -> list[str]:
    rows = report.get("scores") or []
    if not rows:
        return []
    names = report.get("score_names") or {}
    columns: list[str] = []
    for key in [*names, "in_domain", "out_of_domain", *(k for r in rows for k in r)]:
        if key not in columns and key not in ("policy", "note") and any(key in r for r in rows):
            columns.append(key)
    has_note = any(r.get("note") for r in rows)
    head = ["policy", *(names.get(c, c) for c in columns), *(["note"] if has_note else [])]
    out = ["<h2>Scores</h2>", "<table>", "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        cells = [f"<td>{_e(r.get('policy', ''))}</td>"]
        cells += [f'<td class="num">{_e(_fmt_score(r.get(c)))}</td>' for c in columns]
        if has_note:
            cells.append(f"<td>{_e(r.get('note') or '')}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return out


def _plots(run_dir: Path, report: dict) -> list[str]:
    plots = report.get("plots") or []
    if not plots:
        return []
    out = ["<h2>Plots</h2>", '<div class="plots">']
    for p in plots:
        title = p.get("title") or p.get("path", "")
        url, shown = _link(run_dir, p.get("path", ""))
        if url is None:
            out.append(f'<p class="missing">{_e(title)}: {_e(shown)}, skipped</p>')
        else:
            out.append(
                f'<figure class="plot"><a href="{_e(url)}"><img src="{_e(url)}" alt="{_e(title)}"></a>'
                f"<figcaption>{_e(title)}</figcaption></figure>"
            )
    out.append("</div>")
    return out


def _facts(report: dict) -> list[str]:
    facts = report.get("facts") or {}
    if not facts:
        return []
    rows = "".join(f'<tr><th>{_e(k)}</th><td class="num">{_e(_fmt_number(v))}</td></tr>' for k, v in facts.items())
    return ["<h2>Facts</h2>", f"<table>{rows}</table>"]


def render(run_dir: Path, report: dict) -> str:
    """The page as a string (write_report writes it); `run_dir` is where relative paths are looked up."""
    if not isinstance(report, dict) or not report.get("title"):
        raise ValueError("report needs a non-empty 'title'")
    # A misspelt key would silently drop a section; the dict is built in code, so fail where it is built.
    unknown = sorted(set(report) - set(KEYS))
    if unknown:
        raise ValueError(f"report has unknown keys {unknown}; known: {list(KEYS)}")
    run_dir = Path(run_dir)
    warnings = report.get("warnings") or []
    if isinstance(warnings, str):
        warnings = [warnings]
    body = [f"<h1>{_e(report['title'])}</h1>"]
    if report.get("subtitle"):
        body.append(f'<p class="subtitle">{_e(report["subtitle"])}</p>')
    if report.get("verdict"):
        body.append(f'<p class="verdict">{_e(report["verdict"])}</p>')
    body += [f'<p class="warning">&#9888; {_e(w)}</p>' for w in warnings]
    body += _samples(run_dir, report) + _scores(report) + _plots(run_dir, report) + _facts(report)
    body.append('<pre id="video-durations" hidden></pre>')
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(report['title'])}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + f"\n<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )


def write_report(run_dir: Path, report: dict) -> Path:
    """Write run_dir/report.html (atomically) from `report` (the keys are in the module docstring)."""
    run_dir = Path(run_dir)
    return write_bytes_atomic(run_dir / "report.html", render(run_dir, report).encode("utf-8"))


__all__ = ["KEYS", "render", "write_report"]
