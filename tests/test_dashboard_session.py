"""Dashboard sessions and charts as pure logic: any cookie that is not exactly one this server
signed (and still valid) is E_AUTH, never another exception; form tokens are bound to their
session; chart geometry stays inside the plot."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otaguard.errors import ErrorCode, ServerError
from otaguard.server.dashboard import charts
from otaguard.server.dashboard.session import SESSION_S, Sessions


class Clock:
    def __init__(self) -> None:
        self.t = 1_900_000_000.0

    def __call__(self) -> float:
        return self.t


def code_of(fn: object, *args: object) -> ErrorCode:
    with pytest.raises(ServerError) as e:
        fn(*args)  # type: ignore[operator]
    return e.value.code


def test_round_trip_expiry_logout_and_another_server() -> None:
    clock = Clock()
    s = Sessions(clock)
    cookie, sess = s.issue(7, "ops-1", "operator")
    assert s.check(cookie) == sess and sess.role == "operator"
    assert code_of(Sessions(clock).check, cookie) == ErrorCode.AUTH  # another key (restart)
    clock.t += SESSION_S - 1
    assert s.check(cookie) == sess
    clock.t += 1
    assert code_of(s.check, cookie) == ErrorCode.AUTH  # expired inside the signed payload
    clock.t -= SESSION_S
    s.end(sess)
    assert code_of(s.check, cookie) == ErrorCode.AUTH  # logged out


def test_form_tokens_are_bound_to_their_session_and_purpose() -> None:
    s = Sessions(Clock())
    _, a = s.issue(1, "a", "operator")
    _, b = s.issue(2, "b", "operator")
    s.check_csrf(a, s.csrf(a))
    assert code_of(s.check_csrf, a, s.csrf(b)) == ErrorCode.CSRF
    assert code_of(s.check_csrf, a, None) == ErrorCode.CSRF
    login_cookie, form = s.login_nonce()
    s.check_login(login_cookie, form)
    assert code_of(s.check_login, login_cookie, s.csrf(a)) == ErrorCode.CSRF
    session_cookie, _ = s.issue(1, "a", "operator")  # a session cookie is no log-in cookie
    assert code_of(s.check_login, session_cookie, form) == ErrorCode.CSRF


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.hex()))
def test_any_other_cookie_is_e_auth(junk: str) -> None:
    s = Sessions(Clock())
    assert code_of(s.check, junk) == ErrorCode.AUTH


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_any_flipped_character_is_e_auth(pos: int, delta: int) -> None:
    s = Sessions(Clock())
    cookie, _ = s.issue(3, "sec", "security-officer")
    i = pos % len(cookie)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    c = alphabet[(alphabet.index(cookie[i]) + 1 + delta % (len(alphabet) - 1)) % len(alphabet)]
    assert c != cookie[i]
    assert code_of(s.check, cookie[:i] + c + cookie[i + 1 :]) == ErrorCode.AUTH


@given(
    st.lists(st.tuples(st.floats(0, 1e6), st.floats(-10, 1e4)), min_size=1, max_size=50),
    st.floats(1, 1e4),
)
def test_chart_points_stay_in_the_plot(points: list[tuple[float, float]], y_max: float) -> None:
    c = charts.line_chart("t", [("s", "ok", points)], y_max=y_max, hlines=[(y_max / 2, "half")])
    x0, y0, x1, y1 = c.plot
    for s in c.series:
        for pair in s.points.split():
            x, y = map(float, pair.split(","))
            assert x0 <= x <= x1 and y0 <= y <= y1
    assert c.yticks[0].label == "0"


def test_empty_charts() -> None:
    assert charts.line_chart("t", [], y_max=1).empty
    assert charts.bar_chart("t", [("v1", 0, "v-old")]).empty
    bars = charts.bar_chart("t", [("v1", 1, "v-old"), ("v2", 3, "v-new")]).bars
    assert [b.value for b in bars] == [1, 3] and bars[1].width == 3 * bars[0].width
