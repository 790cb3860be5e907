from pipelines.core.progress import Progress, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_line_has_count_rate_and_eta_of_the_work_done_since_start():
    clock = Clock()
    progress = Progress(total=1300, unit="steps", done=400, clock=clock)  # resumed at 400
    clock.now += 10.0
    assert progress.line(420) == "420/1300 steps (32%), 2 steps/s, ETA 0:07:20"  # (1300 - 420) / 2 s


def test_nothing_done_yet_has_no_eta():
    progress = Progress(total=8, unit="shards", clock=Clock())
    assert progress.line(0) == "0/8 shards (0%), 0 shards/s, ETA ?"


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.9, 61, 3600 * 27 + 5)] == ["0:00:00", "0:00:59", "0:01:01", "27:00:05"]
