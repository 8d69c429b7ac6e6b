"""Drive the real ComfyUI frontend in headless Chromium (run with a Python that has playwright).

    python frontend_script.py check   URL PACK SHOT_DIR           -> JSON report on stdout, screenshots in SHOT_DIR
    python frontend_script.py convert URL WORKFLOW_DIR             -> (maintainer tool) rebuild UI workflows from
                                                                       example_workflows/api/*.api.json + notes.json

``check`` opens every template the server lists for the pack PACK the way a user does (Browse Templates, the pack's
category, the card: the frontend fetches the template from the server) and reports, per template, whether its
thumbnail showed, the page errors and console errors while it opened, the node types the frontend does not know and
every node's widget values by name, for the test to compare with the workflow's API twin. Only the system Chromium is used (never a downloaded browser).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]

WIDGETS_JS = """() => app.graph._nodes.map(n => ({
    id: String(n.id), type: n.type, title: n.title,
    known: !!LiteGraph.registered_node_types[n.type],
    widgets: Object.fromEntries((n.widgets || []).map(w => [w.name, w.value]))
}))"""


FRESH_PROFILE_404 = ("/user.css", "/favicon.ico", "/api/userdata/user.css", "/api/userdata/comfy.templates.json",
                     "/api/userdata?dir=workflows&", "/api/userdata?dir=subgraphs%2F&")
"""Files a new ComfyUI user does not have yet: the frontend asks for them at startup and logs the 404 as an error."""


def _open(p, url):
    """A browser page on the frontend, ready to use, and the list its page errors and console errors go to (each
    ``{"kind", "text", "url"}``), startup's included; the 404s of ``FRESH_PROFILE_404`` at startup are left out."""
    browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    page = browser.new_page(viewport={"width": 1600, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append({"kind": "pageerror", "text": f"{e.message}\n{e.stack}", "url": ""}))
    page.on("console", lambda m: errors.append({"kind": "console", "text": m.text, "url": m.location.get("url", "")})
            if m.type == "error" else None)
    page.goto(url)
    page.wait_for_function("window.app && window.app.graph && window.LiteGraph && app.vueAppReady !== false",
                           timeout=90000)
    page.wait_for_timeout(1500)
    page.keyboard.press("Escape")
    errors[:] = [e for e in errors if not (e["text"].startswith("Failed to load resource") and e["url"].startswith(url)
                                           and e["url"][len(url):].startswith(FRESH_PROFILE_404))]
    return browser, page, errors


def open_template(page, module: str, name: str) -> bool:
    """Open a custom pack's template as a user does: Browse Templates, the pack's category, the card. True when the
    card's thumbnail image was shown (loaded with a size) before the click."""
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.locator('[data-testid="template-workflows-content"]').wait_for(timeout=30000)
    page.get_by_role("option", name=module, exact=True).click()
    card = page.locator(f'[data-testid="template-workflow-{name}"]')
    card.wait_for(timeout=30000)
    try:
        card.locator("img").first.wait_for(timeout=15000)
        page.wait_for_function("(el) => el.complete && el.naturalWidth > 0",
                               arg=card.locator("img").first.element_handle(), timeout=15000)
        thumbnail = True
    except Exception:
        thumbnail = False
    card.click()
    page.locator('[data-testid="template-workflows-content"]').wait_for(state="detached", timeout=30000)
    page.wait_for_function("(n) => app.extensionManager.workflow.activeWorkflow?.filename === n", arg=name,
                           timeout=30000)
    return thumbnail


def _strip_nulls(x, key=None):
    """The frontend serialises unset fields as null, which its own schema then rejects on load: drop them."""
    if isinstance(x, dict):
        return {k: _strip_nulls(v, k) for k, v in x.items() if v is not None or k in ("link", "links")}
    if isinstance(x, list):
        return [_strip_nulls(v) for v in x]
    return x


FIT_JS = """() => {
    const nodes = app.graph._nodes;
    let x0 = 1e9, y0 = 1e9, x1 = -1e9, y1 = -1e9;
    for (const n of nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const c = app.canvas.canvas, m = 40;
    const s = Math.min((c.width / devicePixelRatio - 2 * m) / (x1 - x0), (c.height / devicePixelRatio - 2 * m - 60) / (y1 - y0), 1.2);
    app.canvas.ds.scale = s;
    app.canvas.ds.offset = [m / s - x0, (m + 60) / s - y0];
    app.canvas.setDirty(true, true);
}"""


def check(url: str, module: str, shot_dir: Path) -> dict:
    from playwright.sync_api import sync_playwright

    report = {}
    shot_dir.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser, page, errors = _open(p, url)
        report["_startup_errors"] = list(errors)
        names = page.evaluate("async () => (await (await fetch('/api/workflow_templates')).json())")[module]
        for name in names:
            errors.clear()
            thumbnail = open_template(page, module, name)
            page.wait_for_timeout(800)
            page.keyboard.press("Escape")
            # a missing-node dialog names the unknown types; also look at the graph itself
            dialog = page.locator("text=/missing node|not found/i").count()
            invalid = page.locator("text=/Invalid workflow/i").count()
            nodes = page.evaluate(WIDGETS_JS)
            page.evaluate(FIT_JS)
            page.wait_for_timeout(600)
            page.screenshot(path=str(shot_dir / (name + ".png")))
            report[name] = {"nodes": nodes, "missing_dialog": dialog, "invalid_alerts": invalid,
                            "thumbnail_shown": thumbnail, "errors": list(errors)}
            page.evaluate("() => document.querySelectorAll('.p-toast-message .p-toast-close-button')"
                          ".forEach(b => b.click())")
        browser.close()
    return report


def run_shots(url: str, wf_dir: Path, shot_dir: Path, names: list[str]) -> None:
    """(maintainer tool) Open, queue and run each workflow in the browser, then screenshot it with its outputs."""
    from playwright.sync_api import sync_playwright

    shot_dir.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser, page, _ = _open(p, url)
        for name in names:
            wf = json.loads((wf_dir / f"{name}.json").read_text())
            page.evaluate("async (a) => { await app.loadGraphData(a[0], true, true, a[1]); }", [wf, name])
            page.wait_for_timeout(500)
            page.evaluate("async () => { await app.queuePrompt(0, 1); }")
            page.wait_for_timeout(2000)
            for _ in range(600):
                q = page.evaluate("async () => await (await fetch('/queue')).json()")
                if not q["queue_running"] and not q["queue_pending"]:
                    break
                page.wait_for_timeout(1000)
            page.wait_for_timeout(2500)
            page.evaluate(FIT_JS)
            page.wait_for_timeout(800)
            page.screenshot(path=str(shot_dir / f"{name}_run.png"))
        browser.close()


def convert(url: str, wf_dir: Path) -> None:
    from playwright.sync_api import sync_playwright

    notes = json.loads((wf_dir / "api" / "notes.json").read_text())
    layout = json.loads((wf_dir / "api" / "layout.json").read_text())
    with sync_playwright() as p:
        browser, page, _ = _open(p, url)
        for api_path in sorted((wf_dir / "api").glob("*.api.json")):
            name = api_path.name[: -len(".api.json")]
            api = json.loads(api_path.read_text())
            ui = page.evaluate("""async ([api, note, name, lay]) => {
                await app.loadApiJson(api, name);
                const g = app.graph;
                for (const n of g._nodes) {
                    const l = lay[String(n.id)];
                    if (l) { n.pos = l.slice(0, 2); if (l.length === 4) n.size = l.slice(2, 4); }
                }
                const nn = LiteGraph.createNode("Note");
                nn.title = "About this workflow";
                nn.widgets[0].value = note;
                nn.pos = lay.note.slice(0, 2);
                nn.size = lay.note.slice(2, 4);
                g.add(nn);
                for (const n of g._nodes) {
                    for (const w of (n.widgets || [])) {
                        if (w.name === "control_after_generate") w.value = "fixed";  // reproducible examples
                    }
                    if (n.type !== "Note" && n.type.startsWith("ReDiFine")) {
                        n.properties = Object.assign({}, n.properties || {}, {cnr_id: "comfyui-redifine"});
                    }
                }
                return g.serialize();
            }""", [api, notes[name], name, layout[name]])
            ui = _strip_nulls(ui)
            (wf_dir / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
        browser.close()


if __name__ == "__main__":
    mode, url, wf = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    if mode == "check":
        print(json.dumps(check(url, sys.argv[3], Path(sys.argv[4]))))
    elif mode == "run":
        run_shots(url, wf, Path(sys.argv[4]), sys.argv[5:])
    elif mode == "convert":
        convert(url, wf)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
