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
