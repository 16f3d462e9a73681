"""The documentation holds together: every config key has its doc line (the one source of the generated reference
and of CLI help), every docs page or README section that code names exists, and every relative link and anchor in
docs/*.md and README.md resolves. `mkdocs build --strict` (in .ci/run) checks the built site as well; these checks
run without MkDocs installed."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import yaml

from llmctl import config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CODE_DIRS = ("llmctl", "scripts", "tests", ".ci")
# `docs/serving.md` or `docs/serving.md#errors` in code; `README "Quick start"` for a README section
DOC_REF = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+))?")
README_REF = re.compile(r"""README ["']([^"']+)["']""")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


# ----------------------------------------------------------------------------------------------------------------
# (a) every config field has a doc line


def test_every_config_field_has_a_doc_line():
    missing = [f.key for f in config.all_fields() if not f.doc.strip()]
    assert not missing, f"config fields without a doc line (a string right under the field): {missing}"


def test_doc_lines_belong_to_fields():
    """A docstring under something that is not a field (a renamed key's leftover) would silently document nothing."""
    from llmctl.config.fields import field_docs, section_classes

    for section, cls in section_classes().items():
        names = {f.name for f in config.all_fields() if f.section == section}
        assert set(field_docs(cls)) <= names, (section, set(field_docs(cls)) - names)
        assert (cls.__doc__ or "").strip() and not cls.__doc__.startswith(cls.__name__ + "("), section


def test_field_info():
    info = config.field_info("generate.temperature")
    assert (info.section, info.name, info.type, info.default) == ("generate", "temperature", float, 0.8)
    assert info.key == "generate.temperature" and "greedy" in info.doc
    assert config.field_info("train.min_lr").type_text == "float or null"
    assert config.field_info("train.lr_schedule").type_text == "one of cosine, linear, constant, wsd"
    assert config.field_info("generate.compile").default_text == "auto"
    assert config.field_info("finetune.lora_targets").default_text == "[attn.qkv, attn.proj, mlp.fc, mlp.proj]"
    assert config.field_info("train.log").type_text == "list of tensorboard"
    with pytest.raises(KeyError, match="generate.temperature"):
        config.field_info("generate.temprature")
    with pytest.raises(KeyError):
        config.field_info("nosection.key")
    keys = [f.key for f in config.all_fields()]
    assert len(keys) == len(set(keys)) and keys[0] == "model.arch"


def test_field_docs_reads_the_string_under_each_field():
    from llmctl.config.fields import field_docs

    src = ROOT / "llmctl" / "config" / "inference.py"
    doc = field_docs(config.GenerateConfig)["temperature"]
    assert f'temperature: float = 0.8\n    """{doc}"""' in src.read_text()


# ----------------------------------------------------------------------------------------------------------------
# The generated configuration reference


def _hook():
    spec = importlib.util.spec_from_file_location("config_ref", DOCS / "hooks" / "config_ref.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_lists_every_key_with_its_doc():
    hook = _hook()
    text = hook.reference()
    with hook._clean_environment():  # (the page shows data.cache_dir as a fresh shell has it)
        fields = config.all_fields()
    assert "`~/.cache/llmctl`" in text and str(config.default_cache_dir()) not in text.replace("~/.cache/llmctl", "")
    for f in fields:
        row = next((line for line in text.splitlines() if line.startswith(f"| `{f.key}` |")), None)
        assert row is not None, f.key
        assert "no doc line" not in row and f.default_text.replace("|", "\\|") in row, row
    assert hook.MARKER in (DOCS / hook.PAGE).read_text()


# ----------------------------------------------------------------------------------------------------------------
# Anchors as MkDocs (Python-Markdown's toc) and GitHub write them


def slugify(heading: str) -> str:
    """Python-Markdown's default toc slug of a heading's text (code spans and links reduced to their text)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _without_code(text: str) -> str:
    """Markdown without fenced blocks and inline code, where neither links nor headings count."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    if page.parent == DOCS:
        hook = _hook()
        if page.name == hook.PAGE:  # the generated reference's headings (one per section)
            text = text.replace(hook.MARKER, hook.reference())
    found: set[str] = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), re.M):
        slug = base = slugify(m.group(1))
        n = 0
        while slug in found:  # a repeated heading gets _1, _2, ...
            n += 1
            slug = f"{base}_{n}"
        found.add(slug)
    return found


def broken_links(page: Path) -> list[str]:
    """Relative links of a Markdown file whose file, or #anchor in it, does not exist."""
    bad = []
    for target in LINK.findall(_without_code(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{page.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{page.name}: {target} (no heading #{anchor} in {dest.name})")
    return bad


# ----------------------------------------------------------------------------------------------------------------
# (b) references to docs in code, (c) links in the docs


def doc_references(root: Path = ROOT) -> list[tuple[Path, str, str | None]]:
    """(file, page, anchor) for every docs/PAGE.md[#anchor] named in code, scripts, tests and CI."""
    refs = []
    for d in CODE_DIRS:
        for f in sorted((root / d).rglob("*")):
            if f.is_file() and f.suffix in ("", ".py", ".sh") and f.name != Path(__file__).name:
                text = f.read_text(encoding="utf-8", errors="replace")
                refs += [(f, page, anchor) for page, anchor in DOC_REF.findall(text)]
                refs += [(f, "README.md", slugify(section)) for section in README_REF.findall(text)]
    return refs


def test_code_names_only_docs_that_exist():
    refs = doc_references()
    assert len({f for f, _, _ in refs}) >= 5  # the scan finds the references there are
    bad = []
    for f, page, anchor in refs:
        target = ROOT / page if page == "README.md" else DOCS / page
        if not target.exists():
            bad.append(f"{f.relative_to(ROOT)}: {page} does not exist")
        elif anchor and anchor not in anchors(target):
            bad.append(f"{f.relative_to(ROOT)}: {page} has no section #{anchor}")
    assert not bad, "\n".join(bad)


def test_relative_links_resolve():
    pages = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
    bad = [b for page in pages for b in broken_links(page)]
    assert not bad, "\n".join(bad)


def test_nav_lists_every_page():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = {next(iter(item.values())) for item in nav}
    assert listed == {p.name for p in DOCS.glob("*.md")}


def test_readme_is_a_landing_page_with_the_ci_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    command = re.search(r'pip install -e "\.\[test\]" && (python -m pytest -q[^\n]*)', readme).group(1)
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()  # CI runs exactly the README's command


def test_xdist_groups_keep_their_tests_on_one_worker(tmp_path):
    # the README's command relies on `--dist loadgroup` honouring xdist_group marks (docs/development.md says which
    # tests); pytest 9.2 with pytest-xdist 3.8 drops them without a word, which only a real two-worker run shows
    pytest.importorskip("xdist")
    (tmp_path / "test_grouped.py").write_text(
        "import pytest\n"
        "@pytest.mark.xdist_group('one')\n"
        "@pytest.mark.parametrize('i', range(6))\n"
        "def test_g(i):\n    pass\n")
    command = [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider", "-rA"]
    run = subprocess.run(command + [str(tmp_path / "test_grouped.py")], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "@one" in run.stdout  # the group suffix xdist gives a grouped test's id


# ----------------------------------------------------------------------------------------------------------------
# The checks themselves fail where they should


def test_the_checks_catch_what_they_look_for(tmp_path):
    assert slugify("Interoperability: HF and GGUF") == "interoperability-hf-and-gguf"
    assert slugify("The default: `auto`") == "the-default-auto"
    assert slugify("Compression: half the parameters, 20% of the steps") == (
        "compression-half-the-parameters-20-of-the-steps")
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Part one\n\n[ok](#part-one) [gone](#part-two) [missing](nowhere.md) "
                    "[web](https://example.com) `[code](no.md)`\n\n```\n[fenced](no.md)\n```\n")
    assert broken_links(page) == ["page.md: #part-two (no heading #part-two in page.md)",
                                  "page.md: nowhere.md (no such file)"]
    (tmp_path / "llmctl").mkdir()
    (tmp_path / "llmctl" / "x.py").write_text('# see docs/serving.md#errors and README "Quick start"\n')
    assert [(p, a) for _, p, a in doc_references(tmp_path)] == [("serving.md", "errors"), ("README.md", "quick-start")]


def test_help_shows_extras_in_brackets():
    """Rich reads `[gguf]` as markup and drops it unless escaped; the help must say which extra to install."""
    from typer.testing import CliRunner

    from llmctl.cli import app

    for command, extra in (("export", "llmctl[gguf]"), ("eval", "llmctl[eval]"), ("plot", "llmctl[plot]")):
        out = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert extra in out, (command, out)


def test_cli_help_shows_config_defaults_from_the_config_itself():
    """A flag that is shorthand for a config key shows "KEY, DEFAULT" in --help, read from the key's field: no
    default is written by hand in the CLI, so help cannot drift from the code when a default changes."""
    import click
    import typer.main

    from llmctl.cli import app
    from llmctl.config import all_fields

    keys = {f.key: f for f in all_fields()}
    shown = []

    def walk(cmd: click.Command) -> None:
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)
        for p in cmd.params:
            default = getattr(p, "show_default", None)
            if isinstance(default, str) and default.split(",")[0] in keys:
                shown.append((cmd.name, p.name, default))

    walk(typer.main.get_command(app))
    assert len(shown) >= 10  # the sampling flags of infer and serve, --dtype, --quantize, --compile, --batch-size
    for command, param, default in shown:
        key, _, value = default.partition(", ")
        if value and not value.startswith(("else ", "the ")):  # "eval.text_column, else data.text_column"
            assert value == keys[key].default_text, f"{command} --{param}: shows {value!r}, {key} is {keys[key]}"


def test_docs_name_only_source_files_that_exist():
    """A page that sends readers to `llmctl/x.py` (or scripts/, tests/) follows the code when modules move."""
    pattern = re.compile(r"\b((?:llmctl|scripts|tests)/[\w/]+\.(?:py|sh))\b")
    named = [(page.name, path) for page in [ROOT / "README.md", *DOCS.glob("*.md")]
             for path in pattern.findall(page.read_text(encoding="utf-8"))]
    assert len(named) >= 10
    missing = [f"{page}: {path}" for page, path in named if not (ROOT / path).exists()]
    assert not missing, "\n".join(missing)
