import pytest
from PIL import Image

from molmo.pointing import Point, draw_points, parse_points


def test_single_and_multi_point_tags_become_pixels():
    text = ('Here <point x="61.5" y="40.6" alt="dog">dog</point> and '
            '<points x1="10.0" y1="20.0" x2="30.5" y2="40.1" alt="cars">cars</points>.')
    pts = parse_points(text, width=200, height=100)
    assert pts == [Point(123.0, 40.6, "dog"), Point(20.0, 20.0, "cars"), Point(61.0, pytest.approx(40.1), "cars")]


def test_attribute_order_missing_alt_and_malformed_tags():
    assert parse_points('<point alt="a" y="50" x="25">a</point>', 400, 200) == [Point(100.0, 100.0, "a")]
    assert parse_points('<point x="10" y="10">cat</point>', 100, 100) == [Point(10.0, 10.0, "cat")]
    assert parse_points('<point x="abc" y="1">x</point> <point x="1">y</point> <point x="150" y="1">z</point>',
                        100, 100) == []
    assert parse_points("no points here", 10, 10) == []


def test_markers_are_drawn_at_the_points():
    img = Image.new("RGB", (120, 80), (0, 0, 255))
    out = draw_points(img, [Point(30, 20, "a"), Point(90, 60, "b")])
    assert out.size == img.size and img.getpixel((30, 20)) == (0, 0, 255)
    for x, y in ((30 - 4, 20), (90 + 4, 60)):
        r, g, b = out.getpixel((x, y))
        assert r > 200 and b < 100  # red marker
    assert out.getpixel((5, 75)) == (0, 0, 255)
