"""The status page in headless Chromium: a real gateway (simulated Modbus line, embedded broker), its page
rendered by a real browser, and what the browser shows compared with what the MQTT retained topics hold.

One Chromium run per load gives both the rendered DOM (`--dump-dom`) and a PNG of the same load
(`--screenshot`). The DOM is the assertion on the values; the screenshot is checked to be a real
rendering of that DOM in which the values are visible: the dumped DOM rendered again from a file gives
the same pixels, and the same DOM with only the ramp's value changed does not.

Chromium is Debian's (`make test` installs it, like mosquitto); without it this test fails, not skips.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from gateway.app import Gateway
from gateway.config import load_config

from configs import Section, broker, config, device, line, point, sim_line, sim_slave, simulator, write
from helpers import Subscriber, free_port, subscribed

WIDTH, HEIGHT = 1280, 900
CHROMIUM_TIMEOUT = 30.0
PREFIX = "fieldgate/shot1"


def page_config(http: int, mqtt: int) -> Section:
    """A ramping plc with a setpoint and a label, a dead device, the status page on `http`."""
    plc = device(
        "plc",
        1,
        poll="100ms",
        points=[
            point("ramp", "holding", 0, "uint16"),
            point("setpoint", "holding", 5, "uint16"),
            point("label", "holding", 10, "string:8"),
        ],
    )
    ghost = device("ghost", 3, poll="100ms", points=[point("level", "input", 0)])
    values = {
        "ramp": {"wave": "ramp", "min": 0, "max": 60000, "step": 1, "period": "1s"},
        "setpoint": {"value": 4321},
        "label": {"value": "north"},
    }
    return config(
        id="shot1",
        http=f"127.0.0.1:{http}",
        broker=broker(mqtt, process="inline"),
        buses=[line("rs485", "./ttyA", plc, ghost)],
        simulator=simulator(modbus=[sim_line("./ttyA", sim_slave(1, values), sim_slave(3, dead=True))]),
    )


def chromium_binary() -> str:
    """Debian's chromium (or a chromium-browser on PATH); fails the test with what to do when there is none."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "chromium not found on PATH: the status page's browser test needs it; "
            "run `make test` (its `chromium` target installs Debian's chromium)",
            pytrace=False,
        )
    return found


@dataclass
class Load:
    """One load of a URL in headless Chromium: the DOM it rendered, a screenshot of it, and when."""

    dom: str
    png: Path
    started: float  # monotonic, before Chromium was started
    ended: float  # monotonic, after it exited


class Browser:
    """Headless Chromium run once per load, with its own profile directory under the test's tmp_path."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.profile = workdir / "chromium-profile"

    async def load(self, url: str, name: str) -> Load:
        """Open `url` at the window size; return its rendered DOM and a PNG of the window."""
        png = self.workdir / f"{name}.png"
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            self.binary,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={self.profile}",
            f"--window-size={WIDTH},{HEIGHT}",
            f"--screenshot={png}",
            "--dump-dom",
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), CHROMIUM_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            pytest.fail(f"chromium did not finish loading {url} within {CHROMIUM_TIMEOUT:.0f} s")
        ended = time.monotonic()
        tail = "\n".join(err.decode(errors="replace").splitlines()[-10:])
        assert proc.returncode == 0, f"chromium exited {proc.returncode} on {url}:\n{tail}"
        assert png.is_file(), f"chromium wrote no screenshot for {url}:\n{tail}"
        return Load(out.decode(), png, started, ended)

    async def render(self, html: str, name: str) -> Path:
        """Screenshot an HTML document from a file (a DOM as dumped, re-rendered for comparison)."""
        path = self.workdir / f"{name}.html"
        path.write_text(html, encoding="utf-8")
        return (await self.load(path.as_uri(), name)).png


class RenderedPage(HTMLParser):
    """The rendered status page: value cells by (device, point) and device rows (cell texts, state class)."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.values: dict[tuple[str, str], str] = {}
        self.devices: dict[str, list[str]] = {}
        self.state_class: dict[str, str] = {}
        self._section = ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._point: tuple[str, str] | None = None
        self._dd: list[str] | None = None
        self._span_class: str | None = None
        self.feed(dom)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self._section = a.get("id") or ""
        elif tag == "tr" and self._section == "devices":
            self._row, self._span_class = [], None
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "span" and self._row is not None and len(self._row) == 2:  # the state cell
            self._span_class = a.get("class")
        elif tag == "div" and "data-point" in a:
            self._point = (a.get("data-device") or "", a.get("data-point") or "")
        elif tag == "dd" and self._point is not None:
            self._dd = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row:
                self.devices[self._row[0]] = self._row
                self.state_class[self._row[0]] = self._span_class or ""
            self._row = None
        elif tag == "dd" and self._dd is not None and self._point is not None:
            self.values[self._point] = "".join(self._dd)
            self._dd = self._point = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._dd is not None:
            self._dd.append(data)


def held_during(sub: Subscriber, topic: str, load: Load, slack: float = 0.2) -> set[str]:
    """Every payload `topic` held while the page loaded: the one retained before it, and any published during it.

    `slack` covers the few milliseconds between the gateway taking a sample (the page shows it at once)
    and its publish reaching this subscriber.
    """
    messages = sub.on(topic)
    before = [m for m in messages if m.at <= load.started]
    during = [m for m in messages if load.started < m.at <= load.ended + slack]
    return {m.payload.decode() for m in before[-1:] + during}


def assert_screenshot(png: Path) -> Image.Image:
    """A valid PNG of the window size whose rows are not all one colour; returned as RGB."""
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
    with Image.open(png) as img:
        img.verify()  # chunk CRCs and structure
    img = Image.open(png)
    img.load()  # decodes every pixel: a truncated or corrupt image data stream raises here
    assert img.format == "PNG" and img.size == (WIDTH, HEIGHT), (img.format, img.size)
    rgb = img.convert("RGB")
    pixels, stride = rgb.tobytes(), 3 * WIDTH
    rows = (pixels[y * stride : (y + 1) * stride] for y in range(HEIGHT))
    busy = sum(1 for row in rows if row != row[:3] * WIDTH)
    # The page's tables take a few hundred rows of the window; a blank page or a bare error text would not.
    assert busy > HEIGHT // 5, f"{png}: only {busy} of {HEIGHT} pixel rows are not one colour"
    return rgb


def with_value(dom: str, device: str, point: str, text: str) -> str:
    """The dumped DOM as a standards-mode document, with one value cell's text replaced."""
    cell = re.compile(
        rf'(<div data-device="{re.escape(device)}" data-point="{re.escape(point)}"><dt>[^<]*</dt><dd>)[^<]*(</dd>)'
    )
    replaced, n = cell.subn(lambda m: m.group(1) + text + m.group(2), dom)
    assert n == 1, f"{n} value cells for {device}/{point} in the dumped DOM"
    return "<!doctype html>\n" + replaced


@dataclass
class Running:
    """The running gateway, its status page URL and a subscriber to its topics."""

    gw: Gateway
    url: str
    sub: Subscriber


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    """The test gateway, its status page on a free loopback port, a subscriber to all of its topics."""
    http, mqtt = free_port(), free_port()
    gw = Gateway(load_config(write(page_config(http, mqtt), tmp_path)))
    await gw.start()
    try:
        async with subscribed(mqtt, f"{PREFIX}/#") as sub:
            yield Running(gw, f"http://127.0.0.1:{http}/", sub)
    finally:
        await gw.stop()


async def test_status_page_in_chromium_shows_the_live_values(running: Running, tmp_path: Path) -> None:
    browser = Browser(chromium_binary(), tmp_path)
    sub = running.sub
    ramp, setpoint, label = (f"{PREFIX}/plc/{p}" for p in ("ramp", "setpoint", "label"))
    # Ready: every value published at least once, the dead unit declared offline.
    await sub.wait_for(lambda ms: {ramp, setpoint, label} <= {m.topic for m in ms})
    await sub.wait_for(lambda ms: any(m.topic == f"{PREFIX}/ghost/status" and m.payload == b"offline" for m in ms))

    first = await browser.load(running.url, "status-1")
    print(f"status page screenshot: {first.png}")
    await asyncio.sleep(0.2)  # the slack of held_during()
    page = RenderedPage(first.dom)

    # The values the browser shows are the ones the retained topics held while it loaded.
    shown = page.values[("plc", "ramp")]
    assert shown in held_during(sub, ramp, first), (shown, held_during(sub, ramp, first))
    assert page.values[("plc", "setpoint")] == sub.on(setpoint)[-1].payload.decode() == "4321"
    assert page.values[("plc", "label")] == sub.on(label)[-1].payload.decode() == '"north"'
    # The dead unit is offline on the page as on its status topic; the live one online.
    assert page.devices["ghost"][1:3] == ["Modbus rs485, unit 3", "offline"] and page.state_class["ghost"] == "offline"
    assert page.devices["plc"][1:3] == ["Modbus rs485, unit 1", "online"] and page.state_class["plc"] == "online"
    assert sub.on(f"{PREFIX}/ghost/status")[-1].payload == b"offline"
    assert ("ghost", "level") not in page.values  # it never answered: no value to show
    assert page.devices["ghost"][3:] == ["—", "-"], page.devices["ghost"]

    # The screenshot is that DOM rendered, with the ramp's value visible in the window.
    live = assert_screenshot(first.png)
    same = Image.open(await browser.render(with_value(first.dom, "plc", "ramp", shown), "as-dumped")).convert("RGB")
    assert ImageChops.difference(live, same).getbbox() is None, "the screenshot is not the dumped DOM rendered"
    other_value = str((int(shown) + 11111) % 60001)
    other = Image.open(await browser.render(with_value(first.dom, "plc", "ramp", other_value), "other")).convert("RGB")
    cell = ImageChops.difference(live, other).getbbox()
    assert cell is not None, f"the ramp's value {shown} does not show in the screenshot {first.png}"
    live.crop(cell).save(tmp_path / "ramp-cell.png")
    left, top, right, bottom = cell
    assert right - left < WIDTH // 2 and bottom - top < 100, f"changing one value moved {cell}, not one cell"

    # Reloaded once the ramp has moved on: the page moves with it.
    await sub.wait_for(
        lambda ms: any(m.topic == ramp and m.at > first.ended and m.payload.decode() != shown for m in ms)
    )
    second = await browser.load(running.url, "status-2")
    await asyncio.sleep(0.2)
    moved = RenderedPage(second.dom).values[("plc", "ramp")]
    assert moved != shown, f"the ramp still shows {shown} after its topic moved on"
    assert moved in held_during(sub, ramp, second), (moved, held_during(sub, ramp, second))
    assert RenderedPage(second.dom).values[("plc", "setpoint")] == "4321"
    assert ImageChops.difference(assert_screenshot(second.png), live).getbbox() is not None
