"""README.md and docs/: every relative link and every project file they name exists, every command
they show runs a script that exists with flags its parser accepts, every `make` target is in the
Makefile (and its recipe's commands parse too), every Python snippet names project functions that
exist, and every figure in docs/ is one a command writes."""
import argparse
import ast
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

import demo
import files
import study

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
SPAN = re.compile(r"`([^`\n]+)`")
PROJECT_FILE = re.compile(r"^[\w.*/-]+\.(py|md|sh|txt)(::\w+)?$|^Makefile$")
TOP = {p.name for p in ROOT.iterdir()}
RUNNERS = ("python", ".venv/bin/python", "torchrun", "make", "bash")
SECTIONS = ("study", "study-mechanism")  # the study sections of docs/results.md


def text_of(page):
    return page.read_text(encoding="utf-8")


def prose(text):
    """The page without its fenced blocks, lines joined (a code span may wrap)."""
    return FENCE.sub("", text).replace("\n", " ")


def slug(heading):
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    return {slug(h) for h in re.findall(r"^#+ (.*)$", FENCE.sub("", text_of(page)), re.M)}


def commands(page):
    """(command, where) for every line of a bash block and every inline span that starts with a
    runner; continuation lines joined, comments dropped."""
    text = text_of(page)
    for lang, body in FENCE.findall(text):
        if lang in ("bash", "sh", ""):
            for line in body.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    yield words, f"{page.name}: {line.strip()}"
    for span in SPAN.findall(prose(text)):
        first = span.split()[0] if span.split() else ""
        if len(span.split()) > 1 and first in RUNNERS or re.match(r"^[A-Z_]+=\S+ ", span):
            yield shlex.split(span), f"{page.name}: `{span}`"


class _Parsed(Exception):
    pass


def parse_only(monkeypatch, script, args):
    """Runs the script's main() until its argument parser has accepted `args`; a parser error is
    its SystemExit. Nothing after the parsing runs."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, a=None, namespace=None):
        original(self, a, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [script, *args])
    module = importlib.import_module(Path(script).stem)
    with pytest.raises(_Parsed):
        module.main()


def make_targets():
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")  # continuation lines joined
    return dict(re.findall(r"^([\w-]+):[^\n]*\n((?:\t[^\n]*\n)*)", text, re.M))


def check_command(words, where, monkeypatch):
    while words and re.match(r"^[A-Z_]+=", words[0]):  # environment assignments
        words = words[1:]
    runner, rest = words[0], words[1:]
    if runner == "make":
        targets = make_targets()
        for target in [w for w in rest if not re.match(r"^[A-Z_]+=", w)]:  # not variable settings
            assert target in targets, f"{where}: no target '{target}' in the Makefile"
            for line in targets[target].splitlines():
                recipe = shlex.split(line.replace("$(PY)", "python"))
                if recipe and recipe[0] == "python":
                    check_command(recipe, f"{where} (Makefile: {line.strip()})", monkeypatch)
        return
    if runner == "bash":
        assert (ROOT / rest[0]).is_file(), f"{where}: no file {rest[0]}"
        return
    if runner == "torchrun":
        rest = rest[next(i for i, w in enumerate(rest) if w.endswith(".py")):]
    assert runner in RUNNERS, f"{where}: unknown runner {runner}"
    if rest[:2] == ["-m", "pytest"]:
        valued = {"-n", "--dist", "-k", "-p", "-m", "--durations"}  # options whose value is the next word
        args = rest[2:]
        for before, arg in zip(["-q", *args], args):
            if not arg.startswith("-") and before not in valued:
                assert (ROOT / arg.split("::")[0]).exists(), f"{where}: no {arg}"
        return
    script, args = rest[0], rest[1:]
    assert (ROOT / script).is_file(), f"{where}: no script {script}"
    try:
        parse_only(monkeypatch, script, args)
    except SystemExit as e:
        pytest.fail(f"{where}: its parser refused the flags ({e})")
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_files_named_exist(page):
    text = text_of(page)
    for target in LINK.findall(prose(text)):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name}: link to {target}: no such heading in {dest.name}"
    for span in SPAN.findall(prose(text)):
        name = span.strip()
        if not PROJECT_FILE.match(name) or ("/" in name and name.split("/")[0] not in TOP):
            continue  # an output or a user's file, not one of the project's
        path, _, test = name.partition("::")
        hits = sorted(ROOT.glob(path))
        assert hits, f"{page.name}: `{name}` names no file of the project"
        if test:
            assert f"def {test}(" in hits[0].read_text(), f"{page.name}: `{name}`: no such test"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_shown_parse(page, monkeypatch):
    for words, where in commands(page):
        check_command(words, where, monkeypatch)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_snippets_name_existing_functions(page):
    for lang, body in FENCE.findall(text_of(page)):
        if lang != "python":
            continue
        tree = ast.parse(body)
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in imported:
                assert hasattr(importlib.import_module(n.value.id), n.attr), f"{page.name}: {n.value.id}.{n.attr}"


def test_readme_is_a_front_page_and_sections_are_whole():
    readme = text_of(ROOT / "README.md")
    assert len(readme.splitlines()) <= 250
    for heading in ("## Set-up", "## The three things people do", "## Results", "## Files", "## Documentation"):
        assert heading in readme, heading
    assert "make demo" in readme and "make test" in readme
    for page in PAGES:
        text = text_of(page)
        for name in re.findall(r"<!-- ([\w-]+):begin -->", text):
            begin, end = files.section_markers(name)
            assert text.count(begin) == 1 and text.count(end) == 1 and text.index(begin) < text.index(end), \
                f"{page.name}: section {name}"


def test_every_figure_in_docs_is_written_by_a_command():
    written = set(demo.figures(Path("out"), Path("out/person"))) | {study.figure_name(s) for s in SECTIONS}
    assert {p.name for p in (ROOT / "docs").glob("*.png")} <= written


def test_the_checks_refuse_a_flag_a_target_and_a_file_that_do_not_exist(monkeypatch, tmp_path):
    with pytest.raises(pytest.fail.Exception, match="refused the flags"):
        check_command([".venv/bin/python", "train_pretrain.py", "--data", "demo", "--no-such-flag"], "x", monkeypatch)
    with pytest.raises(AssertionError, match="no target"):
        check_command(["make", "no-such-target"], "x", monkeypatch)
    page = tmp_path / "page.md"
    page.write_text("See [a](missing.md) and `no_such_module.py`.\n")
    with pytest.raises(AssertionError, match="no such file"):
        test_links_and_files_named_exist(page)
    page.write_text("See `no_such_module.py`.\n")
    with pytest.raises(AssertionError, match="names no file"):
        test_links_and_files_named_exist(page)
