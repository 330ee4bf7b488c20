"""Progress of long work: a bar on a terminal, in a log a line every few seconds and one at the end."""

import io

from model.progress import LogProgress, progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_log_gets_a_line_every_few_seconds_and_one_at_the_end_never_a_frame():
    clock, log = Clock(), io.StringIO()
    with LogProgress(total=10, desc="training", unit="epoch", file=log, every=10.0, clock=clock) as bar:
        for epoch in range(10):
            clock.now += 3.0
            bar.set_postfix(loss=f"{1.0 / (epoch + 1):.4f}")
            bar.update(1)
    assert log.getvalue().splitlines() == [
        "training: 4/10 epoch (loss=0.2500) 12s",
        "training: 8/10 epoch (loss=0.1250) 24s",
        "training: 10/10 epoch (loss=0.1000) 30s",
    ]
    assert "\r" not in log.getvalue()


def test_bytes_are_shown_scaled_and_closing_twice_writes_once():
    clock, log = Clock(), io.StringIO()
    bar = LogProgress(total=2_500_000, desc="reading users.csv", unit="B", file=log, unit_scale=True, clock=clock)
    bar.update(1_250_000)
    bar.close()
    bar.close()
    assert log.getvalue().splitlines() == ["reading users.csv: 1.2M/2.5M B 0s"]


def test_a_terminal_gets_tqdm_a_log_gets_lines_and_disable_gets_nothing():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    from tqdm import tqdm

    terminal = progress(total=3, desc="x", unit="it", file=Terminal())
    assert isinstance(terminal, tqdm)
    terminal.close()
    assert isinstance(progress(total=3, desc="x", unit="it", file=io.StringIO()), LogProgress)
    silent, log = progress(total=3, desc="x", unit="it", disable=True, file=io.StringIO()), io.StringIO()
    with silent as bar:
        bar.update(2)
        bar.set_postfix(loss=1)
    assert bar.n == 2 and log.getvalue() == ""


def test_scaled_amounts_change_prefix_at_a_thousand_and_stop_at_giga():
    bar = LogProgress(total=None, desc="d", unit="B", file=io.StringIO(), unit_scale=True, clock=Clock())
    assert [bar._amount(v) for v in (0, 999, 1000, 999_999, 1_000_000, 2.5e9, 7.5e12)] == \
        ["0", "999", "1.0k", "1000.0k", "1.0M", "2.5G", "7500.0G"]
    plain = LogProgress(total=None, desc="d", unit="B", file=io.StringIO(), clock=Clock())
    assert plain._amount(2_500_000) == "2.5e+06" and plain.unit_scale is False


def test_a_line_without_a_total_and_with_several_postfix_values():
    clock, log = Clock(), io.StringIO()
    bar = LogProgress(total=None, desc="reading", unit="rows", file=log, every=5.0, clock=clock)
    assert bar._line() == "reading: 0 rows 0s"
    bar.set_postfix(loss=0.5, lr="3e-3")
    bar.update()
    bar.update()
    clock.now += 5.0  # exactly the interval: a line
    bar.update(3)
    assert log.getvalue().splitlines() == ["reading: 5 rows (loss=0.5, lr=3e-3) 5s"]


def test_the_silent_bar_counts_what_it_is_given():
    bar = progress(total=None, desc="x", unit="it", disable=True)
    bar.update()
    bar.update(2)
    assert bar.n == 3


def test_a_terminal_bar_gets_the_total_and_description_and_a_file_without_isatty_gets_lines():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = progress(total=7, desc="epochs", unit="epoch", file=Terminal(), leave=False)
    assert (terminal.total, terminal.desc, terminal.unit, terminal.leave) == (7, "epochs", "epoch", False)
    terminal.close()

    class Pipe:  # a file-like object without isatty
        def __init__(self):
            self.text = []

        def write(self, text):
            self.text.append(text)

        def flush(self):
            self.text.append("<flush>")

    pipe = Pipe()
    lines = progress(total=2, desc="x", unit="it", file=pipe, unit_scale=True)
    assert isinstance(lines, LogProgress) and lines.unit_scale is True
    lines.close()
    assert "".join(pipe.text).startswith("x: 0/2 it") and pipe.text[-1] == "<flush>"  # a log sees each line at once


def test_without_a_file_the_lines_go_to_standard_error(capsys):
    bar = progress(total=1, desc="x", unit="it")
    bar.close()
    captured = capsys.readouterr()
    assert captured.err.startswith("x: 0/1 it") and captured.out == ""
