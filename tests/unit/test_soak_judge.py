"""The soak's leak judge (bench/bench_soak.judge) on synthetic /proc series."""

from bench.bench_soak import judge

RSS = 315_000  # KiB, a tracer's size


def series(rss_at, n=31, step_s=3.0, warmup_s=45.0):
    return [(warmup_s + i * step_s, {"VmRSS": rss_at(i), "RssAnon": rss_at(i) - 100_000,
                                     "fds": 130, "threads": 4}) for i in range(n)]


def leak(kib_per_min, step_s=3.0):
    return lambda i: kib_per_min * i * step_s / 60


def test_flat_series_is_no_leak():
    assert judge(series(lambda i: RSS), 45.0)["ok"]


def test_one_mib_per_min_leak_is_caught():
    r = judge(series(lambda i: RSS + leak(1024)(i)), 45.0)
    assert not r["ok"] and "RSS grows" in r["why"]


def test_leak_after_memory_given_back_is_still_caught():
    # the shape CI met (stop 18): the first samples sit 1.2 MiB high and then that memory is
    # given back (a cache emptying after the warm-up's burst), so the least-squares slope of
    # the measured series read -436 KiB/min; with a 1 MiB/min leak added it stays under the
    # bound, while both robust slopes do not
    def given_back(i):
        return RSS + (1200 if i < 4 else 0)
    clean = judge(series(given_back), 45.0)
    assert clean["ok"] and clean["rss_slope_kib_min"] < -300, clean
    r = judge(series(lambda i: given_back(i) + leak(1024)(i)), 45.0)
    assert r["rss_slope_kib_min"] < r["rss_bound_kib_min"], r
    assert not r["ok"] and "RSS grows" in r["why"], r


def test_transient_spikes_are_no_leak():
    # re-analysis holds 30 MiB for one sample now and then, growing towards the end
    def rss(i):
        return RSS + (30_000 if i in (20, 25, 28, 30) else 0)
    r = judge(series(rss), 45.0)
    assert r["ok"], r


def test_fd_growth_is_caught():
    s = series(lambda i: RSS)
    for i, (_, smp) in enumerate(s):
        smp["fds"] = 130 + i // 4
    r = judge(s, 45.0)
    assert not r["ok"] and "fds grew" in r["why"]
