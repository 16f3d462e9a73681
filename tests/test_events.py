"""The one output channel: work reports through `llmctl.events`, and only the console layer decides how it looks."""

import io
import json
import re

import pytest
from rich.console import Console

from conftest import ROOT, TINY, Recorder, invoke, sets
from llmctl import console
from llmctl.console import ConsoleEvents
from llmctl.events import SILENT, with_fields


def shown(quiet=False, command="train", terminal=False, width=40):
    """ConsoleEvents on a console of its own (a pipe unless `terminal`), and a function that returns what it wrote."""
    buf = io.StringIO()
    c = Console(file=buf, width=width, force_terminal=terminal, highlight=False, color_system=None)
    return ConsoleEvents(quiet, command=command, console=c), buf.getvalue


def test_the_silent_default_takes_every_event():
    SILENT.log("x")
    SILENT.warn("y")
    with SILENT.progress("train", 10) as bar:
        bar.update(1, loss=1.0)


def test_derived_fields_ride_on_the_progress_they_name_only():
    events = Recorder()
    derived = with_fields(events, "train", lambda f: {"double": 2 * f["n"]} if "n" in f else {})
    with derived.progress("train", 5) as train, derived.progress("prepare", 9) as prepare:
        train.update(1, n=3)
        train.update(2)
        prepare.update(4, n=3)
    derived.log("hello")
    derived.warn("careful")
    assert events.of("train")[0].updates == [(1, {"n": 3, "double": 6}), (2, {})]
    assert events.of("prepare")[0].updates == [(4, {"n": 3})]
    assert all(p.closed for p in events.progresses)
    assert events.logs == ["hello"] and events.warnings == ["careful"]


def test_log_and_warning_lines_are_one_line_each_and_shown_as_written():
    events, text = shown(width=40)
    message = "resuming from /runs/[dim]x/step-0000010 :smile: " + "a" * 60  # longer than the console
    events.log(message)
    events.warn("skipping step-0000004: [yellow]damaged[/yellow]")
    assert text().splitlines() == [message, "warning: skipping step-0000004: [yellow]damaged[/yellow]"]


def test_quiet_silences_log_lines_and_progress_but_not_warnings():
    events, text = shown(quiet=True)
    events.log("saved runs/x/step-0000010")
    with events.progress("train", 10) as bar:
        bar.update(5, loss=1.0, lr=1e-3, tokens_per_sec=100.0)
    with events.progress("infer", 3) as rows:
        rows.update(1)
    events.warn("the loss is nan")
    assert text() == "warning: the loss is nan\n"


def test_plain_training_lines_in_a_pipe():
    events, text = shown(command="pretrain", width=40)
    with events.progress("train", 10, 2) as bar:
        bar.update(3, loss=2.5, lr=3e-4, grad_norm=1.0)  # a step that measured no throughput: no line
        bar.update(4, loss=2.25, lr=3e-4, grad_norm=1.0, tokens_per_sec=12345.6, mfu=0.125,
                   tokens_per_sec_per_device=6172.8)
        bar.update(5, loss=2.0, lr=2e-4, grad_norm=1.0, tokens_per_sec=999.0, mfu=None)
    lines = text().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"pretrain step 4/10 \| loss 2\.2500 \| lr 3\.00e-04 \| 12,346 \(6,173/device\) tok/s \| "
                        r"MFU 12\.5% \| eta \d+s", lines[0]), lines[0]
    assert re.fullmatch(r"pretrain step 5/10 \| loss 2\.0000 \| lr 2\.00e-04 \| 999 tok/s \| eta \d+s", lines[1])


def test_plain_preparation_lines_in_a_pipe(monkeypatch):
    monkeypatch.setattr(console, "PLAIN_EVERY_S", 0.0)
    events, text = shown()
    with events.progress("prepare", 4_000_000, 1_000_000) as bar:
        bar.update(1_000_000, tokens=500)  # where a resumed preparation starts
        bar.update(3_000_000, tokens=2_500)
    with events.progress("prepare", None) as bar:  # a source of unknown size (hf: streaming)
        bar.update(0, tokens=0)
        bar.update(2_000_000, tokens=100)
    lines = text().splitlines()
    assert lines[0].startswith("prepare: 1.0 / 4.0 MB read (25%), 500 tokens, 0 tokens/s, eta ")
    assert re.fullmatch(r"prepare: 3\.0 / 4\.0 MB read \(75%\), 2,500 tokens, [\d,]+ tokens/s, eta \d+s", lines[1])
    assert re.fullmatch(r"prepare: 2\.0 MB read, 100 tokens, [\d,]+ tokens/s", lines[-1]), lines[-1]


def test_plain_preparation_lines_come_every_few_seconds_only():
    events, text = shown()
    with events.progress("prepare", 100) as bar:
        for done in range(100):
            bar.update(done, tokens=done)
    assert text() == ""  # (the first line would come PLAIN_EVERY_S seconds in)


def test_rows_of_a_job_in_a_pipe_and_bars_on_a_terminal():
    events, text = shown()
    with events.progress("infer", 3) as rows:
        for n in range(1, 4):
            rows.update(n)
    assert text() == "completing 3 prompts\n"
    events, text = shown(command="finetune", terminal=True, width=200)
    with events.progress("train", 10) as bar:
        bar.update(4, loss=2.25, lr=3e-4, grad_norm=1.0, tokens_per_sec=1234.0, mfu=0.5)
    with events.progress("infer", 3) as rows:
        rows.update(3)
    assert "finetune" in text() and "loss 2.2500" in text() and "MFU 50.0%" in text() and "3/3" in text()


def test_progress_of_an_unknown_kind_is_refused():
    events, _ = shown()
    with pytest.raises(ValueError, match="no way to show 'decode' progress"):
        events.progress("decode", 3)


def test_a_slow_precision_is_a_warning_event_not_a_log_line(tiny_run, monkeypatch):
    from llmctl import loading

    monkeypatch.setattr(loading, "slow_precision_warning", lambda *a: "bfloat16 is emulated on this CPU (slow)")
    events = Recorder()
    loading.for_inference(loading.load_model(tiny_run), "bfloat16", "none", compile=False, events=events)
    assert events.warnings == ["bfloat16 is emulated on this CPU (slow)"]
    assert not any("warning" in m for m in events.logs)


def test_unseen_characters_of_a_prompt_are_a_warning_event(tiny_run):
    from llmctl import loading
    from llmctl.commands import inference as inference_cmd

    loaded = loading.for_inference(loading.load_model(tiny_run), "float32", "none", compile=False)
    settings = inference_cmd.sampling_settings(loaded, [], {"max_new_tokens": 2, "temperature": 0})
    events = Recorder()
    rows = inference_cmd.complete_rows(loaded, [{"prompt": "ROMEO:"}, {"prompt": "hi \u2603"}], settings,
                                       events=events)
    assert len(rows) == 2 and len(events.warnings) == 1 and events.warnings[0].startswith("--input row 2: ")
    (progress,) = events.of("infer")
    assert progress.total == 2 and [d for d, _ in progress.updates] == [1, 2] and progress.closed


MARKUP = re.compile(r"\[(yellow|bold|dim|red|green)\b|\[/[a-z ]*\]")  # rich tags, opening and closing
PREFIX = re.compile(r"""f?["']warning: """)  # the console's prefix, written into a message


def test_no_rich_markup_or_severity_prefix_below_the_console_layer():
    """Only the console layer (llmctl/cli/, console.py, views.py) styles text or marks a line as a warning."""
    below = [p for p in (ROOT / "llmctl").rglob("*.py")
             if "cli" not in p.relative_to(ROOT / "llmctl").parts[:1] and p.name not in ("console.py", "views.py")]
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in below
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if MARKUP.search(line) or PREFIX.search(line)]
    assert below and not found, "\n".join(found)


def test_the_markup_check_finds_what_it_looks_for():
    assert MARKUP.search('log(f"[yellow]warning:[/yellow] {w}")') and MARKUP.search('"[bold]infer"')
    assert MARKUP.search('"[/]"') and not MARKUP.search('"GET /v1/models[/{id}]"')
    assert PREFIX.search('notify(f"warning: {slow}")') and not PREFIX.search('"the warning: below"')


def test_a_training_run_in_a_pipe_and_under_quiet(runner, tmp_path):
    """In a pipe: the config's warning, log lines and one plain line per logged step on stderr, the summary alone on
    stdout. --quiet leaves the warning only."""
    args = [*sets(*TINY, "train.max_steps=2", "train.log_interval=1", "train.eval_interval=0")]
    r = invoke(runner, "pretrain", *args, "--out", tmp_path / "loud", "--json")
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    assert "warning: train.warmup_steps=5 is longer than train.max_steps=2; clamped to 2" in lines
    assert [line.split(" |")[0] for line in lines if " | loss " in line] == ["pretrain step 1/2", "pretrain step 2/2"]
    assert any(line.startswith("saved ") for line in lines) and json.loads(r.stdout)["steps"] == 2
    r = invoke(runner, "pretrain", *args, "--out", tmp_path / "quiet", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines() == ["warning: train.warmup_steps=5 is longer than train.max_steps=2; clamped to 2"]
    assert json.loads(r.stdout)["steps"] == 2
