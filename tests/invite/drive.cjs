// Drives the invite page in headless Chromium for tests/invite.rs (playwright-core with
// Debian's /usr/bin/chromium; axe-core for the accessibility check). Prints one JSON line.
//   node drive.cjs signup  URL HOSTRULES TAKEN_USER USER PASSWORD
//   node drive.cjs message URL HOSTRULES
//   node drive.cjs nojs    URL HOSTRULES
"use strict";
const fs = require("fs");
const { chromium } = require("playwright-core");

const [mode, url, hostRules, ...rest] = process.argv.slice(2);
const axeSource = fs.readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");

// INVITE_SCREENSHOTS=DIR keeps a phone-sized picture of each state (for a person to look at).
async function shot(page, name) {
  const dir = process.env.INVITE_SCREENSHOTS;
  if (dir) await page.screenshot({ path: `${dir}/${mode}-${name}.png`, fullPage: true });
}

async function axe(page) {
  // page.evaluate runs through the DevTools protocol, so the page's CSP does not stop it.
  await page.evaluate(axeSource);
  const r = await page.evaluate(() => window.axe.run(document, { resultTypes: ["violations"] }));
  return r.violations.map((v) => `${v.id}: ${v.help} (${v.nodes.map((n) => n.target.join(" ")).join(", ")})`);
}

(async () => {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--disable-dev-shm-usage", `--host-resolver-rules=${hostRules}`,
    ],
  });
  const out = { logs: [], violations: [] };
  try {
    const ctx = await browser.newContext({
      ignoreHTTPSErrors: true,
      javaScriptEnabled: mode !== "nojs",
      viewport: { width: 390, height: 844 }, // a phone
    });
    const page = await ctx.newPage();
    page.on("console", (m) => out.logs.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => out.logs.push(`pageerror: ${e.message}`));
    page.on("requestfailed", (r) => out.logs.push(`requestfailed: ${r.url().split("?")[0]} ${r.failure() && r.failure().errorText}`));
    page.setDefaultTimeout(30000);
    await page.goto(url, { waitUntil: "load" });
    if (mode === "nojs") {
      // Without JavaScript only what the HTML shows (axe itself needs JavaScript).
      out.text = await page.evaluate(() => document.body.innerText);
      await shot(page, "page");
    } else if (mode === "axe") {
      out.violations = await axe(page);
    } else if (mode === "message") {
      await page.waitForSelector("#status.problem");
      out.text = await page.textContent("#status");
      out.formVisible = await page.isVisible("#signup");
      await shot(page, String(Date.now()));
      out.violations = await axe(page);
    } else if (mode === "signup") {
      const [taken, user, password] = rest;
      await page.waitForSelector("#signup", { state: "visible" });
      out.status = await page.textContent("#status");
      out.violations.push(...(await axe(page)));
      await shot(page, "form");
      // As typed: a taken name is named taken, a free one available.
      await page.type("#username", taken, { delay: 20 });
      await page.waitForFunction(() => /taken/.test(document.getElementById("username-note").textContent));
      out.takenNote = await page.textContent("#username-note");
      await page.fill("#username", "");
      await page.type("#username", user, { delay: 20 });
      await page.waitForFunction(() => /available/.test(document.getElementById("username-note").textContent));
      out.freeNote = await page.textContent("#username-note");
      // Two different passwords are refused before anything is sent.
      await page.fill("#password", password);
      await page.fill("#password2", password + "x");
      await page.click("#submit");
      out.mismatch = await page.textContent("#status");
      await page.fill("#password2", password);
      // Keyboard only: Enter in the last field submits.
      await page.focus("#password2");
      await page.keyboard.press("Enter");
      await page.waitForSelector("#done", { state: "visible" });
      out.mxid = await page.textContent("#mxid");
      out.status = await page.textContent("#status");
      out.done = await page.textContent("#done");
      out.elementHref = await page.getAttribute("#element-link", "href");
      out.focused = await page.evaluate(() => document.activeElement && document.activeElement.id);
      await shot(page, "done");
      out.violations.push(...(await axe(page)));
    } else {
      throw new Error(`unknown mode ${mode}`);
    }
  } catch (e) {
    out.error = String(e && e.stack || e);
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
})();
