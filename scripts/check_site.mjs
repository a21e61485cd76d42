// Render every page of the built site in headless Chromium and check what a reader would see.
//
// Usage: node scripts/check_site.mjs SITE_DIR SCREENSHOT_DIR
//
// Per page (file:// URLs, as a reader opens the offline site):
//   - every formula left by pymdownx.arithmatex was rendered by KaTeX, and none is a .katex-error;
//   - no request left the machine (anything but file:, data:, blob: is blocked and reported),
//     no request failed, no script error;
//   - KaTeX's fonts loaded (a DOM count alone passes while glyphs are blank);
//   - no displayed equation runs into its tag, at a desktop width of WIDTH pixels;
//   - every figure (an <img> from figures/) is in a <figure> with a non-empty <figcaption>;
//   - overflow, REPORTED BUT NOT YET FAILING (the pages still have it; issue 14): a display that
//     scrolls at WIDTH (its tag out of view), and a page wider than the viewport at WIDTH or at
//     the phone width NARROW. Each is listed under "warnings"; make them problems once fixed;
//   - a screenshot (the top of the page, at most MAX_HEIGHT pixels) goes to SCREENSHOT_DIR.
// Prints one line per page and a JSON summary on the last line; exits 1 if any page has a problem.
// Chromium: $CHROMIUM, or /usr/bin/chromium (Debian package `chromium`).

import { mkdirSync, readdirSync, statSync } from "node:fs";
import { join, relative, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { chromium } from "playwright-core";

const WIDTH = 1280;
const NARROW = 390;
const MAX_HEIGHT = 6000;
const LOCAL = /^(file|data|blob|about):/;

function htmlFiles(dir) {
  return readdirSync(dir)
    .sort()
    .flatMap((name) => {
      const path = join(dir, name);
      if (statSync(path).isDirectory()) return name === "vendor" ? [] : htmlFiles(path);
      return name.endsWith(".html") && name !== "404.html" ? [path] : [];
    });
}

async function checkPage(context, site, file, screenshots) {
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (error) => problems.push(`script error: ${error.message}`));
  page.on("requestfailed", (request) => {
    const reason = request.failure()?.errorText ?? "failed";
    problems.push(`request failed (${reason}): ${request.url()}`);
  });
  await page.route("**/*", (route) => {
    const url = route.request().url();
    if (LOCAL.test(url)) return route.continue();
    problems.push(`network request: ${url}`);
    return route.abort("blockedbyclient");
  });

  await page.goto(pathToFileURL(file).href, { waitUntil: "load" });
  const found = await page.evaluate(async () => {
    await document.fonts.ready;
    const formulas = [...document.querySelectorAll(".arithmatex")];
    const fonts = [...document.fonts].filter((face) => face.family.startsWith("KaTeX"));
    return {
      formulas: formulas.length,
      rendered: formulas.filter((el) => el.querySelector(".katex")).length,
      errors: [...document.querySelectorAll(".katex-error")].map((el) => el.title || el.textContent),
      fontsLoaded: fonts.filter((face) => face.status === "loaded").map((face) => face.family),
      fontsFailed: fonts.filter((face) => face.status === "error").map((face) => face.family),
      // A display whose equation runs into its tag, e.g. (C5), at this width.
      overlaps: [...document.querySelectorAll(".katex-display .tag")]
        .filter((tag) => {
          const range = document.createRange();
          range.selectNodeContents(tag); // the label's glyphs, not its (flexible) box
          const left = range.getBoundingClientRect().left;
          const bases = tag.parentElement.querySelectorAll(":scope > .base");
          return [...bases].some((base) => base.getBoundingClientRect().right > left - 4);
        })
        .map((tag) => tag.textContent),
      // A figure without a caption a reader can see under it.
      uncaptioned: [...document.querySelectorAll('img[src*="figures/"]')]
        .filter((img) => !img.closest("figure")?.querySelector("figcaption")?.textContent.trim())
        .map((img) => img.getAttribute("src")),
      height: document.documentElement.scrollHeight,
    };
  });
  for (const src of found.uncaptioned) problems.push(`figure without a caption: ${src}`);

  // Overflow: displays that scroll at this width (their tag out of view), and a page wider
  // than the viewport, at the desktop and the phone width.
  const overflow = async () =>
    page.evaluate(() => ({
      page: document.documentElement.scrollWidth - document.documentElement.clientWidth,
      displays: [...document.querySelectorAll(".md-typeset div.arithmatex")]
        .filter((div) => div.scrollWidth > div.clientWidth + 1)
        .map((div) => div.querySelector(".tag")?.textContent || div.textContent.slice(0, 40)),
    }));
  const wide = await overflow();
  const warnings = [];
  for (const display of wide.displays) warnings.push(`display scrolls at ${WIDTH} px: ${display}`);
  if (wide.page > 1) warnings.push(`page is ${wide.page} px wider than the viewport at ${WIDTH} px`);
  if (found.rendered !== found.formulas) {
    problems.push(`${found.formulas - found.rendered} of ${found.formulas} formulas not rendered`);
  }
  for (const error of found.errors) problems.push(`.katex-error: ${error}`);
  for (const tag of found.overlaps) problems.push(`equation overlaps its tag ${tag}`);
  for (const family of found.fontsFailed) problems.push(`font failed to load: ${family}`);
  if (found.formulas > 0 && !found.fontsLoaded.includes("KaTeX_Main")) {
    problems.push("KaTeX_Main font not loaded: formulas would show blank or fallback glyphs");
  }

  const name = relative(site, file).replaceAll("/", "__").replace(/\.html$/, ".png");
  const height = Math.min(found.height, MAX_HEIGHT);
  await page.screenshot({
    path: join(screenshots, name),
    fullPage: true,
    clip: { x: 0, y: 0, width: WIDTH, height },
  });
  await page.setViewportSize({ width: NARROW, height: 900 });
  const narrow = await overflow();
  if (narrow.page > 1) {
    warnings.push(`page is ${narrow.page} px wider than the viewport at ${NARROW} px`);
  }
  await page.close();
  return { page: relative(site, file), formulas: found.formulas, problems, warnings };
}

async function main() {
  const [siteArg, shotsArg] = process.argv.slice(2);
  if (!siteArg || !shotsArg) {
    console.error("usage: node scripts/check_site.mjs SITE_DIR SCREENSHOT_DIR");
    process.exit(2);
  }
  const site = resolve(siteArg);
  const screenshots = resolve(shotsArg);
  mkdirSync(screenshots, { recursive: true });
  const files = htmlFiles(site);
  if (files.length === 0) {
    console.error(`check_site: no HTML pages in ${site}`);
    process.exit(2);
  }

  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
  });
  const results = [];
  try {
    const context = await browser.newContext({ viewport: { width: WIDTH, height: 900 } });
    for (const file of files) results.push(await checkPage(context, site, file, screenshots));
  } finally {
    await browser.close();
  }

  for (const { page, formulas, problems, warnings } of results) {
    console.log(`${problems.length ? "FAIL" : "ok  "} ${page} (${formulas} formulas)`);
    for (const problem of problems) console.log(`     ${problem}`);
    for (const warning of warnings) console.log(`     warning: ${warning}`);
  }
  const failed = results.filter((r) => r.problems.length > 0).length;
  console.log(JSON.stringify({ pages: results.length, failed, screenshots, results }));
  process.exit(failed > 0 ? 1 : 0);
}

await main();
