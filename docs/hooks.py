"""mkdocs hook: publish the benchmark plots that `benchmarks/` writes, as `results/<name>.png`.

The pages link `results/<name>.png`; the files stay where the benchmarks write them
(`benchmarks/results/`), so a re-run benchmark shows up in the site without a copy to refresh.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def on_files(files: Files, config) -> Files:
    for png in sorted(RESULTS.glob("*.png")):
        if png.stem.endswith("_quick"):  # --quick runs' plots are git-ignored scratch
            continue
        files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
    return files
