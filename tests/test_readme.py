"""The README's quick start and install section: every picture it shows exists, the quick run's own
pictures are shown, and the install states its size and the CPU-only build of torch."""

from __future__ import annotations

import re

from helpers import REPO

README = (REPO / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def test_every_picture_the_readme_shows_exists():
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert pictures
    missing = [path for path in pictures if not (REPO / path).is_file()]
    assert not missing, missing


def test_the_quick_start_shows_what_the_quick_run_draws_and_how_it_was_made():
    quick = _section("Install and run")
    for picture in ("docs/images/unrolled-quick.png", "docs/images/samples-quick.png"):
        assert f"]({picture})" in quick
        assert f"--out {picture}" in quick


def test_the_install_says_its_size_and_how_to_get_the_cpu_only_torch():
    install = _section("Install and run")
    assert re.search(r"about\s+3 GB to download", install)
    assert re.search(r"5\.6 GB\s+virtual environment", install)
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu\npip install ." in install
