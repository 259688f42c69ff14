"""Figure conventions that a reader carries from one figure to the next."""

import numpy as np

from ipo_gap import plots


def test_a_method_has_one_colour_in_every_figure():
    """Colours were assigned by a method's place in each figure's own run list: "offline
    ipo" was orange in Fig. 1 and pink in Fig. 4, where orange was the exact replay."""
    fig1 = ["online ipo", "offline ipo"]
    fig4 = [
        "online ipo",
        "offline ipo (exact order)",
        "offline ipo (shuffled w4)",
        "offline ipo (shuffled w16)",
        "offline ipo (shuffled uniform)",
        "offline ipo",
    ]
    for method in fig1:
        assert plots._color(fig1, method) == plots._color(fig4, method)
    assert plots._color(fig4, "offline ipo (shuffled uniform)") == plots.METHOD_COLORS[plots.TANDEM]
    colours = [plots._color(fig4, m) for m in fig4]
    assert len(set(colours)) == len(colours)  # and distinct within the figure
    beyond = ["online ipo", "semi-online ipo (s=10)", "semi-online ipo (s=inf)", "hypo"]
    colours = [plots._color(beyond, m) for m in beyond]
    assert len(set(colours)) == len(colours)
    assert not set(colours[1:3]) & set(plots.METHOD_COLORS.values())


def test_fig11_draws_each_interval_from_its_own_ends(tmp_path, monkeypatch):
    """An interval that does not hold its point (BCa's can sit beside it) is drawn from its
    lower to its upper end; error bars of |end - point| drew [-3.90, -2.02] for [-3.90,
    -2.98] around -2.5."""
    saved = []
    monkeypatch.setattr(plots, "save", lambda fig, path: saved.append(fig) or path)
    iv = np.array([[0.60, 0.70], [0.75, 0.78]])  # the second excludes its point 0.74
    plots.figure_scaling(
        [1e6, 4e6], ["toy-s", "toy-m"], [0.65, 0.74], tmp_path / "f.png", intervals=iv
    )
    (ax,) = saved[0].axes
    (bars,) = ax.collections
    ends = sorted((s[0][1], s[1][1]) for s in bars.get_segments())
    np.testing.assert_allclose(ends, iv)


def test_fig11_names_each_size_at_its_own_tick_and_labels_no_other(tmp_path, monkeypatch):
    """Three sizes within a decade and a half: the log axis labelled its minor ticks, whose
    labels overlapped (3x10^5 on 4x10^5), and the names beside the points were cut at the
    frame. The sizes are now the only ticks, each labelled by name and parameter count,
    inside the axes."""
    saved = []
    monkeypatch.setattr(plots, "save", lambda fig, path: saved.append(fig) or path)
    params = [242_816, 1_272_576, 6_478_592]
    plots.figure_scaling(params, ["toy-s", "toy-m", "toy-l"], [0.6, 0.55, 0.66], tmp_path / "f.png")
    (ax,) = saved[0].axes
    np.testing.assert_array_equal(ax.get_xticks(), params)
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "toy-s\n242,816",
        "toy-m\n1,272,576",
        "toy-l\n6,478,592",
    ]
    assert len(ax.get_xticks(minor=True)) == 0
    lo, hi = ax.get_xlim()
    assert lo < params[0] and params[-1] < hi
