#!/usr/bin/python3
"""The dashboard in headless Chromium, as an admin uses it.

A real `blockswarm serve` on loopback with a captured image and a group of
four PCs, four real agents writing target files (one too small): log in (a
wrong token first), start the group, watch the tiles move to done (and one
PC's error on hover and with its log on a click), see the history entry;
re-image one PC; start and stop the group; approve an unknown PC;
change a PC's job; log out. A screenshot is saved at each step, and on
failure with the server's log. Run by scripts/dashboard-ui.
"""

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MACS = ["52:54:00:00:70:01", "52:54:00:00:70:02", "52:54:00:00:70:03"]
# A PC whose disk is too small: its agent fails, and says why.
SMALL = "52:54:00:00:70:04"
STRANGER = "52:54:00:00:70:99"
# Loopback only: never through a proxy.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(cond, what, timeout=90, every=0.25):
    """Polls `cond` until it returns something true; returns that."""
    t0 = time.time()
    while True:
        v = cond()
        if v:
            return v
        if time.time() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def get(url, token=None):
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with HTTP.open(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


class Run:
    def __init__(self, args):
        self.bin = args.bin
        self.dir = tempfile.mkdtemp(prefix="blockswarm-ui-")
        self.shots = args.shots
        self.keep = args.keep
        self.procs = []
        self.driver = None
        self.token = secrets.token_hex(16)
        self.step = 0
        os.makedirs(self.shots, exist_ok=True)

    # --- the server and the PCs ---

    def setup(self):
        master = os.path.join(self.dir, "master.img")
        env = dict(os.environ, SCALE="32")
        subprocess.run([os.path.join(REPO, "tests/fixtures/mkdisk"), master, "bare"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        self.size = os.path.getsize(master)
        subprocess.run([self.bin, "capture", master, "--out",
                        os.path.join(self.dir, "images/lab"), "--store"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port, seed = free_port(), free_port()
        self.url = f"http://127.0.0.1:{port}"
        members = ", ".join(f'"{m}"' for m in MACS + [SMALL])
        hosts = "".join(f'[[host]]\nmac = "{m}"\nname = "pc-{i + 1}"\n'
                        for i, m in enumerate(MACS + [SMALL]))
        cfg = f"""listen = "127.0.0.1:{port}"
seed_listen = "127.0.0.1:{seed}"
images = "{self.dir}/images"
state_dir = "{self.dir}/state"
admin_token = "{self.token}"
announce_interval = 2
# Slow enough to watch the tiles move.
seed_upload_limit = "2M"
{hosts}
[[group]]
name = "room1"
members = [{members}]
[group.job]
image = "lab"
on_done = "nothing"
keep_seeding = "deployment"
seed_cap_minutes = 2

[[group]]
name = "spare"
"""
        with open(os.path.join(self.dir, "server.toml"), "w") as f:
            f.write(cfg)
        self.log = os.path.join(self.dir, "serve.log")
        self.spawn([self.bin, "serve", "--config", os.path.join(self.dir, "server.toml")], self.log)

        def seeding():
            code, body = get(f"{self.url}/api/v1/deployment")
            return code == 200 and any(
                i["name"] == "lab" and i["state"] == "seeding" for i in json.loads(body)["images"])
        wait(seeding, "the image to be seeding")
        # A PC nobody approved asks for a job: the server now knows it.
        code, _ = get(f"{self.url}/api/v1/jobs/{STRANGER}")
        assert code == 404, code

    def spawn(self, argv, log):
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(log, "ab"))
        self.procs.append(p)
        return p

    def agent(self, i):
        """Boots PC `i` (of MACS, then SMALL): an agent writing a blank target file."""
        target = os.path.join(self.dir, f"pc{i + 1}.img")
        mac = (MACS + [SMALL])[i]
        with open(target, "wb") as f:
            f.truncate(self.size if mac != SMALL else 1 << 20)
        return self.spawn([self.bin, "agent", "--server", self.url, "--mac", mac,
                           "--target", target, "--listen", f"127.0.0.1:{free_port()}"],
                          target + ".log")

    # --- the browser ---

    def browser(self):
        o = webdriver.ChromeOptions()
        o.binary_location = "/usr/bin/chromium"
        for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--window-size=1400,1000", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  f"--user-data-dir={self.dir}/chromium"]:
            o.add_argument(a)
        self.driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
        self.driver.set_page_load_timeout(30)

    def shot(self, name):
        self.step += 1
        self.driver.save_screenshot(os.path.join(self.shots, f"{self.step:02d}-{name}.png"))

    def find(self, css, timeout=20):
        return WebDriverWait(self.driver, timeout).until(
            EC.presence_of_element_located((By.CSS_SELECTOR, css)))

    def click(self, css):
        # The page redraws what changed once a second: find it again if it did.
        def clicked():
            try:
                WebDriverWait(self.driver, 20).until(
                    EC.element_to_be_clickable((By.CSS_SELECTOR, css))).click()
                return True
            except StaleElementReferenceException:
                return False
        wait(clicked, f"clicking {css}", timeout=20)

    def accept(self):
        WebDriverWait(self.driver, 10).until(EC.alert_is_present())
        self.driver.switch_to.alert.accept()

    def text(self, css):
        """The text of the first element `css` matches ("" if none)."""
        return self.driver.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)

    def cells(self, css):
        """The texts of what `css` matches, read at once."""
        return self.driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map(e => e.innerText);", css)

    def select(self, css, value):
        """Chooses `value` in a select, as a person does (a change event)."""
        def chosen():
            try:
                Select(self.find(css)).select_by_value(value)
                return True
            except StaleElementReferenceException:
                return False
        wait(chosen, f"choosing {value} in {css}", timeout=20)

    def tiles(self, dep):
        """The tiles of deployment `dep` in the room view: (mac, state, bar %)."""
        return self.driver.execute_script(
            """return [...document.querySelectorAll(
                 `#running .room[data-deployment="${arguments[0]}"] .tile`)].map(
                 t => [t.dataset.mac, t.dataset.state, parseFloat(t.querySelector('.bar > div').style.width) || 0]);""",
            dep)

    def tab(self, name):
        self.click(f"#tab-{name}")

    def history_row(self, dep):
        self.tab("history")
        return wait(lambda: self.cells(f'#history tr[data-deployment="{dep}"] td'),
                    f"deployment {dep} in the history")

    def start_group(self, group, expect=None):
        self.tab("room")
        wait(lambda: group in [o.get_attribute("value") for o in
                               Select(self.find("#start-group")).options], "the groups")
        self.select("#start-group", group)
        self.find("#start-expect").clear()
        if expect:
            self.find("#start-expect").send_keys(str(expect))
        self.driver.execute_script("document.getElementById('start-msg').textContent = ''")
        self.click("#start-go")
        msg = wait(lambda: self.text("#start-msg"), "the start's answer")
        assert "started" in msg, msg
        return int(msg.split()[1])

    # --- the test ---

    def test(self):
        d = self.driver
        d.get(self.url + "/")
        self.find("#token").send_keys("not the token")
        self.click("button[type=submit]")
        wait(lambda: "Wrong token" in self.text("#message"), "the login to be refused")
        self.shot("login-refused")
        self.find("#token").send_keys(self.token)
        self.click("button[type=submit]")
        self.find("#view-room")
        cookies = {c["name"]: c for c in d.get_cookies()}
        assert cookies["blockswarm_session"]["httpOnly"], cookies
        assert cookies["blockswarm_session"]["sameSite"] == "Strict", cookies

        # The room boots: its PCs ask, nothing runs yet, then the admin starts it.
        agents = [self.agent(i) for i in range(len(MACS) + 1)]
        small = agents.pop()
        dep = self.start_group("room1", expect=len(MACS))
        wait(lambda: len(self.tiles(dep)) == len(MACS) + 1, "a tile per PC")
        self.shot("started")
        seen, moving, last = set(), False, {}
        t0 = time.time()

        def finished():
            nonlocal moving
            tiles = self.tiles(dep)
            for mac, state, pct in tiles:
                seen.add(state)
                if state == "downloading" and 0 < pct < 100 and pct > last.get(mac, 0) > 0:
                    moving = True
                last[mac] = pct
            if "downloading" in seen and self.step < 3:
                self.shot("downloading")
            head = self.text(f'#running .room[data-deployment="{dep}"] .state')
            return head == "done" and all(s in ("done", "seeding") for m, s, _ in tiles if m != SMALL)
        wait(finished, "every tile to be done", timeout=240, every=0.3)
        took = time.time() - t0
        self.shot("done")
        assert "downloading" in seen, f"no tile was seen downloading: {seen}"
        assert moving, "no progress bar was seen moving"
        assert self.text(f'#running .room[data-deployment="{dep}"] .dismiss') == "Dismiss"
        print(f"dashboard-ui: tiles seen {sorted(seen)}; {len(MACS)} PCs done in {took:.1f} s")
        for a in agents:
            assert a.wait(timeout=120) == 0, "an agent failed"
        assert small.wait(timeout=60) != 0, "the agent with a small disk did not fail"

        # The failed PC: its error on hover, and with its log on a click.
        tile = f'#running .room[data-deployment="{dep}"] .tile[data-mac="{SMALL}"]'
        title = wait(lambda: self.driver.execute_script(
            "const t = document.querySelector(arguments[0]); "
            "return t.classList.contains('has-error') && t.title", tile), "the small PC's error")
        assert "is too small" in title, title
        self.click(tile)
        wait(lambda: "is too small" in self.text("#detail .err") and self.text("#detail pre.log")
             not in ("", "(no log lines yet)"), "the small PC's log")
        self.shot("error-and-log")
        self.click("#detail .close")

        row = self.history_row(dep)
        # #, group, image, state, started, took, done, failed, cancelled
        assert row[1] == "room1" and row[3] == "done" and row[6] == "3", row
        self.click(f'#history tr[data-deployment="{dep}"] button')
        wait(lambda: len(self.driver.find_elements(By.CSS_SELECTOR, "#history-room .tile")) == 4,
             "the history's tiles")
        self.shot("history")

        # Re-image one PC: a deployment of just that one.
        self.tab("hosts")
        self.click(f'#hosts tr[data-mac="{MACS[0]}"] .reimage')
        self.accept()
        wait(lambda: "re-image started" in self.text("#hosts-msg"), "the re-image")
        again = self.agent(0)
        self.tab("room")
        wait(lambda: [t[1] for t in self.tiles(dep + 1)] in (["done"], ["seeding"]),
             "the re-imaged PC to be done", timeout=180)
        assert again.wait(timeout=120) == 0, "the re-imaging agent failed"
        row = self.history_row(dep + 1)
        assert row[1] == "—" and row[3] == "done" and row[6] == "1", row

        # Start the room again and stop it: its PCs are cancelled.
        self.tab("room")
        stopped = self.start_group("room1")
        self.find(f'#running .room[data-deployment="{stopped}"] .stop')
        self.click(f'#running .room[data-deployment="{stopped}"] .stop')
        self.accept()
        wait(lambda: self.text(f'#running .room[data-deployment="{stopped}"] .state') == "stopped",
             "the stop")
        wait(lambda: [t[1] for t in self.tiles(stopped)] == ["cancelled"] * 4, "cancelled tiles")
        row = self.history_row(stopped)
        assert row[3] == "stopped" and row[8] == "4", row

        # The unknown PC is listed first; approve it into the spare group.
        # A name is outside input to the page: it must show as text.
        status, _ = self.bearer_put(f"/api/v1/admin/hosts/{MACS[1]}",
                                    {"name": '<img id="pwn" src="x">'})
        assert status == 200, status
        self.tab("hosts")
        first = '#hosts tr:first-child'
        wait(lambda: self.driver.execute_script(
            "return document.querySelector(arguments[0])?.dataset.mac", first) == STRANGER,
            "the unknown PC first")
        assert "unknown" in self.driver.execute_script(
            "return document.querySelector(arguments[0]).className", first)
        assert not d.find_elements(By.ID, "pwn"), "a host's name was parsed as HTML"
        assert '<img id="pwn"' in self.text(f'#hosts tr[data-mac="{MACS[1]}"]')
        self.select(f'#hosts tr[data-mac="{STRANGER}"] .approve-group', "spare")
        self.click(f'#hosts tr[data-mac="{STRANGER}"] .approve')
        wait(lambda: "approved" in self.text("#hosts-msg"), "the approval")
        wait(lambda: self.cells(f'#hosts tr[data-mac="{STRANGER}"] td')[3] == "spare",
             "the approved PC in its group")
        cells = self.cells(f'#hosts tr[data-mac="{STRANGER}"] td')
        assert cells[0] == "", cells

        # Give one PC a job of its own.
        self.select(f'#hosts tr[data-mac="{MACS[2]}"] .job', "lab")
        wait(lambda: "job image lab" in self.text("#hosts-msg"), "the job change")
        wait(lambda: self.cells(f'#hosts tr[data-mac="{MACS[2]}"] td')[4] == "lab",
             "the PC's own job")
        self.shot("hosts")

        self.click("#logout")
        self.find("#token")
        status, _ = get(f"{self.url}/api/v1/admin/hosts")
        assert status == 401, status
        self.shot("logged-out")

    def bearer_put(self, path, body):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="PUT",
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        try:
            with HTTP.open(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def cleanup(self):
        if self.driver:
            self.driver.quit()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True, help="the blockswarm binary")
    ap.add_argument("--shots", default=os.path.join(REPO, "target/dashboard-ui"),
                    help="where screenshots go")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    shutil.rmtree(args.shots, ignore_errors=True)
    run = Run(args)
    t0 = time.time()
    try:
        run.setup()
        run.browser()
        run.test()
    except BaseException:
        if run.driver:
            try:
                run.shot("FAILED")
            except Exception as e:  # the browser may be gone
                print(f"no screenshot: {e}", file=sys.stderr)
        log = getattr(run, "log", None)
        if log and os.path.exists(log):
            with open(log, errors="replace") as f:
                print("--- server log (end) ---\n" + "".join(f.readlines()[-40:]), file=sys.stderr)
        print(f"dashboard-ui: FAILED after {time.time() - t0:.0f} s; screenshots in {args.shots}"
              + (f", work folder {run.dir}" if args.keep else ""), file=sys.stderr)
        raise
    finally:
        run.cleanup()
    print(f"dashboard-ui: ok in {time.time() - t0:.0f} s; screenshots in {args.shots}")


if __name__ == "__main__":
    main()
