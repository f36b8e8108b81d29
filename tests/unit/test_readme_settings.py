"""The README's settings table against monitor/settings.py, so that neither drifts.

Every setting has a row naming its flag and its environment variable, every row names
settings that exist, and each default the table gives is the default the code has.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from pathlib import Path
from typing import Any

import pytest

from monitor import settings
from monitor.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"

# Defaults the table describes in words rather than spells out, each with the reason the
# code's value is what the words say.
DESCRIBED = {
    "--node-name": ("hostname", ""),  # "" is replaced by socket.gethostname()
    "--kubeconfig": ("in-cluster", ""),  # "" means the in-cluster service account
    "--runtime-dirs": ("containerd's and CRI-O's (and podman's) bundle dirs",
                       Settings.runtime_dirs),
    "--probes": ("all", ()),  # empty means every probe
}
_SIZES = {"M": 1_000_000, "GiB": 1 << 30, "MiB": 1 << 20}


def table() -> list[tuple[list[str], list[str], str]]:
    """(flags, env tokens, default text) of each row of the README's settings table."""
    text = README.read_text()
    section = text.split("\n### Settings\n", 1)[1].split("\n### ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `--"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 4, line
        flags = re.findall(r"`(--[a-z0-9-]+)`", cells[0])
        envs = re.findall(r"`([A-Z0-9_.*]+)`", cells[1])
        rows.append((flags, envs, cells[2]))
    return rows


def _value(text: str) -> Any:
    """A default as the table spells it, read as the code's value would be written."""
    text = text.strip()
    if text.endswith(" s"):  # seconds
        text = text[:-2]
    text = text.strip().strip("`")
    if text in ("none", "none (plain HTTP)"):
        return ""
    if text in ("true", "false"):
        return text == "true"
    size = re.fullmatch(r"(\d+) ?(M|GiB|MiB)", text)
    if size:
        return int(size[1]) * _SIZES[size[2]]
    if re.fullmatch(r"0x[0-9a-f]+|\d+", text):
        return int(text, 0)
    if re.fullmatch(r"\d+\.\d*", text):
        return float(text)
    return text


def _same(code: Any, readme: Any) -> bool:
    if isinstance(code, tuple):
        return code == (() if readme == "" else tuple(str(readme).split(",")))
    if isinstance(code, bool) or isinstance(readme, bool):
        return code is readme
    if isinstance(code, (int, float)) and isinstance(readme, (int, float)):
        return float(code) == float(readme)
    return bool(code == readme)


def test_every_setting_has_a_row_and_every_row_is_a_setting() -> None:
    in_table = [flag for flags, _envs, _default in table() for flag in flags]
    assert len(in_table) == len(set(in_table)), "a flag has two rows"
    assert set(in_table) == {settings.flag_name(n) for n in settings.names()}


@pytest.mark.parametrize("row", table(), ids=lambda r: ",".join(r[0]))
def test_each_row_names_its_settings_environment_variables(
        row: tuple[list[str], list[str], str]) -> None:
    flags, envs, _default = row
    patterns = [settings.ENV_PREFIX + e[len("..._"):] if e.startswith("..._") else e
                for e in envs]
    wanted = [settings.env_name(f[2:].replace("-", "_")) for f in flags]
    for env in wanted:
        assert any(fnmatch.fnmatchcase(env, p) for p in patterns), (env, envs)
    extra = [e for e, p in zip(envs, patterns, strict=True)
             if not any(fnmatch.fnmatchcase(w, p) for w in wanted) and e != "NODE_NAME"]
    assert not extra, f"{flags}: {extra} names no setting of the row"


@pytest.mark.parametrize("row", table(), ids=lambda r: ",".join(r[0]))
def test_each_rows_defaults_are_the_codes(row: tuple[list[str], list[str], str]) -> None:
    flags, _envs, default = row
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    if len(flags) == 1:
        texts = [default]
    else:  # one default per flag, comma-separated, or one for all of them
        texts = [t for t in re.split(r",\s+", default) if t]
        texts = texts * len(flags) if len(texts) == 1 else texts
        assert len(texts) == len(flags), (flags, default)
    for flag, text in zip(flags, texts, strict=True):
        code = fields[flag[2:].replace("-", "_")].default
        if flag in DESCRIBED:
            words, value = DESCRIBED[flag]
            assert (text.strip("`"), code) == (words, value), flag
            continue
        assert _same(code, _value(text)), (flag, text, code)


def test_the_probes_row_lists_every_probe() -> None:
    from monitor.probes import REGISTRY

    row = next(line for line in README.read_text().splitlines() if line.startswith("| `--probes`"))
    named = list(dict.fromkeys(re.findall(r"`([a-z]+)`", row.split(" | ")[3])))
    assert named == list(REGISTRY)
