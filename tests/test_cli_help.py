"""Every option of every command-line tool says what it does, and its default at most once (exactly once for an
option that takes a value); no reStructuredText markup in the help."""

import re

import pytest

CLIS = {
    "egma-bench": "egma_kernels.bench.cli",
    "egma-train": "egma_model.train_cli",
    "egma-eval": "egma_model.eval_cli",
    "egma-demo": "egma_model.demo",
}


def _help_text(module_name, capsys):
    import importlib

    module = importlib.import_module(module_name)
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def _entries(text):
    """``{option: help text}`` from argparse's help output (an entry starts with two spaces and a dash)."""
    section = text.split("options:", 1)[1]
    entries, current = {}, None
    for line in section.splitlines():
        m = re.match(r"^  (-[-\w]+)(.*)$", line)
        if m:
            current = m.group(1)
            entries[current] = m.group(2)
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
        elif line and not line.startswith(" "):
            current = None  # the epilog
    return entries


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_every_option_says_what_and_its_default_once(prog, capsys):
    text = _help_text(CLIS[prog], capsys)
    assert "``" not in text and ":class:" not in text and ":func:" not in text, "RST markup in the help"
    raw = _entries(text)
    entries = {k: " ".join(v.split()) for k, v in raw.items()}
    assert len(entries) > 3
    usage = " ".join(text.split("options:", 1)[0].split())
    required = {o for o in re.findall(r"(?<![\[\w-])(--[\w-]+)", usage)}  # not inside [...]: no default
    for option, entry in entries.items():
        if option == "-h":
            continue
        # argparse puts a value's metavar one space after the option, the help two or more spaces after it
        takes_value = bool(re.match(r"^ \S", raw[option]))
        help_text = entry.split(None, 1)[1] if takes_value else entry
        takes_value = takes_value and option not in required
        what = re.sub(r"\(default[^)]*\)", "", help_text).strip()
        assert len(what) > 8, f"{prog} {option}: no help ({entry!r})"
        n_default = len(re.findall(r"default", help_text, flags=re.IGNORECASE))
        assert n_default <= 1, f"{prog} {option}: default said {n_default} times: {help_text!r}"
        if takes_value:
            assert n_default == 1, f"{prog} {option}: takes a value but does not say its default: {help_text!r}"
        assert "(default: None)" not in help_text, f"{prog} {option}: {help_text!r}"


def test_formatter_adds_a_default_only_where_none_is_said():
    import argparse

    from egma_kernels.cli_support import HelpFormatter

    p = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    p.add_argument("--a", default=3, help="alpha")
    p.add_argument("--b", default=None, help="beta (default: computed)")
    p.add_argument("--c", default="z", help="gamma (default z)")
    p.add_argument("--flag", action="store_true", help="a flag")
    text = " ".join(p.format_help().split())
    assert "alpha (default: 3)" in text
    assert "beta (default: computed)" in text and "(default: None)" not in text
    assert "gamma (default z)" in text and "(default: z)" not in text
    assert "a flag (default" not in text


def test_eval_help_lists_the_paper_table_options(capsys):
    """A user reads egma-eval --help first: the options of the README's "Reproducing the paper" are there, each
    with what it does, and one given without --paper-table says so instead of being ignored."""
    from egma_model.eval_cli import main

    entries = _entries(_help_text("egma_model.eval_cli", capsys))
    for option in ("--paper-table", "--chexpert-5x200", "--rsna", "--siim", "--chexpert", "--chexpert-train",
                   "--chexpert-test"):
        assert option in entries, option
    assert "paper" in entries["--paper-table"]
    assert main(["--checkpoint", "x", "--siim", "s.csv"]) == 2
    assert "--siim is a --paper-table option" in capsys.readouterr().err
