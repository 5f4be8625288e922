"""The device check's JSON as the markdown tables the README's GPU section quotes (`device-check.md`)."""

from __future__ import annotations

from typing import Any


def _cell(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _header(results: dict[str, Any]) -> list[str]:
    m, env = results.get("machine", {}), results.get("environment", {})
    lines = [
        f"# device check, {results.get('started', '')}",
        "",
        f"{m.get('gpu', 'no GPU')} ({m.get('gpu_memory_gib', '-')} GiB), "
        f"{m.get('cpu_cores', '-')} CPU cores; "
        f"Python {m.get('python', '-')}, torch {m.get('torch', '-')}, CUDA {m.get('cuda', '-')}; "
        f"Pillow {m.get('pil', '-')}; image decoding: {m.get('image_backend', '-')}",
        "",
    ]
    if env.get("wheels"):
        lines += [
            f"Installed offline from {env['wheels']['folder']}: {', '.join(env['wheels']['installed'])}",
            "",
        ]
    if env.get("missing"):
        lines += [f"Missing here: {', '.join(env['missing'])}", ""]
    return lines


def _sections_table(results: dict[str, Any]) -> list[str]:
    budget = results.get("budget", {})
    lines = [
        f"Budget {_cell(budget.get('seconds'))} s, {_cell(results.get('total_s'), 1)} s used.",
        "",
        "| section | share s | took s | status |",
        "|---|---|---|---|",
    ]
    for name, found in results.get("sections", {}).items():
        if "error" in found:
            status = f"failed: `{_first_line(found['error'])}`"
        elif "skipped" in found:
            status = f"skipped: {found['skipped']}"
        else:
            status = found.get("status", "done")
        lines.append(
            f"| {name} | {_cell(found.get('share_s'))} | {_cell(found.get('seconds'), 1)} | {status} |"
        )
    return lines + [""]


def _cuda_tests(found: dict[str, Any]) -> list[str]:
    counts = found.get("counts")
    if not counts:
        return []
    lines = ["## `pytest -m cuda`", "", ", ".join(f"{n} {outcome}" for outcome, n in counts.items()), ""]
    for test, why in found.get("failures", {}).items():
        lines.append(f"- FAILED `{test}`: {why}")
    return lines + ([""] if found.get("failures") else [])


def _decode(found: dict[str, Any]) -> list[str]:
    rows = found.get("rows", [])
    if not rows:
        return []
    lines = [
        f"## JPEG decoding ({found.get('photos', '-')} real photos)",
        "",
        "| what | figure |",
        "|---|---|",
    ]
    for row in rows:
        if "skipped" in row:
            figure = f"skipped: {row['skipped']}"
        elif "us_per_image" in row:
            figure = f"{_cell(row['us_per_image'])} µs/image"
        else:
            figure = f"{_cell(row.get('images_per_s'))} images/s"
        lines.append(f"| {row['what']} | {figure} |")
    return lines + [""]


def _ceiling(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [
        "## Training-step ceiling (batch on the device, AMP + channels_last)",
        "",
        "| model | compile | batch | images/s | host syncs / step |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row or "skipped" in row:
            why = f"failed: {_first_line(row['error'])}" if "error" in row else f"skipped: {row['skipped']}"
            lines.append(f"| {row['model']} | {row['compile']} | | {why} | |")
        else:
            lines.append(
                f"| {row['model']} | {row['compile']} | {row['batch_size']} | {_cell(row['images_per_s'])} "
                f"| {_cell(row['host_syncs_per_step'], 1)} |"
            )
    return lines + [""]


def _epochs(rows: list[dict[str, Any]], ceiling: list[dict[str, Any]], data: dict[str, Any]) -> list[str]:
    if not rows:
        return []
    eager = {r["model"]: r["images_per_s"] for r in ceiling if "images_per_s" in r and not r["compile"]}
    lines = [
        f"## One `cocoshard train --amp` epoch per loader mode ({_cell(data.get('train_images'))} generated "
        "images)",
        "",
        "| loader | images/s | of the step's ceiling | waiting for data | GPU busy (mean) | epoch s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row or "skipped" in row:
            why = f"failed: {_first_line(row['error'])}" if "error" in row else f"skipped: {row['skipped']}"
            lines.append(f"| {row['mode']} | {why} | | | | |")
            continue
        top = eager.get(row["model"])
        share = f"{row['images_per_s'] / top:.0%}" if top else "-"
        utilisation = row.get("gpu_utilisation", {}).get("mean_pct")
        lines.append(
            f"| {row['mode']} | {_cell(row['images_per_s'])} | {share} | {row['data_wait_share']:.0%} "
            f"| {_cell(utilisation)}{'%' if utilisation is not None else ''} | {_cell(row['train_s'], 1)} |"
        )
    return lines + [""]


def _bench(report: dict[str, Any] | None) -> list[str]:
    if not report:
        return []
    lines = [
        "## Loaders: training-ready images/s on the device",
        "",
        "| pipeline | images/s | x folder | x best peer | CPU µs/image | output |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in report["pipelines"].items():
        version = f" {entry['version']}" if entry.get("version") else ""
        lines.append(
            f"| {name}{version} | {_cell(entry['images_per_s'])} | {_cell(entry.get('ratio_to_folder'), 2)} "
            f"| {_cell(entry.get('ratio_to_best_peer'), 2)} | {_cell(entry.get('cpu_us_per_image'))} "
            f"| {entry.get('output', '')} |"
        )
    for name, why in report.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {why} | | | | |")
    for name, entry in report.get("decode", {}).items():
        lines.append(f"| {name} | {_cell(entry['images_per_s'])} | | | {_cell(entry['us_per_image'])} | |")
    return lines + [""]


def markdown(results: dict[str, Any]) -> str:
    """The tables the README's GPU section quotes, from the JSON the check writes."""
    sections = results.get("sections", {})
    ceiling = sections.get("ceiling", {}).get("rows", [])
    data = sections.get("data", {})
    lines = _header(results) + _sections_table(results)
    lines += _cuda_tests(sections.get("cuda-tests", {})) + _decode(sections.get("decode", {}))
    lines += _ceiling(ceiling)
    if data.get("why"):
        lines += [f"Data: {data['why']}.", ""]
    lines += _epochs(sections.get("epochs", {}).get("rows", []), ceiling, data)
    scored = sections.get("predict", {})
    if "evaluate_val" in scored:
        val = scored["evaluate_val"]
        lines += [
            "## Predict and evaluate",
            "",
            f"test submission: {scored.get('evaluate_test', {}).get('images', '-')} images, format OK; "
            f"predict {scored.get('predict_test_s', '-')} s. "
            f"val: server F1 {_cell(val.get('server_f1'), 4)}, "
            f"predict {scored.get('predict_val_s', '-')} s.",
            "",
        ]
    lines += _bench(sections.get("bench", {}).get("report"))
    return "\n".join(lines) + "\n"
