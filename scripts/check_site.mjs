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
//   - every figure's smallest text is at least MIN_TEXT pixels on screen at WIDTH: its rendered
//     width / natural width × the smallest text size in image pixels, which the figure's
//     generator records in the PNG (a tEXt chunk, TEXT_KEY; scripts/figure_text.py). A figure
//     without that record fails too;
//   - no overflow: no display and no table scrolls at WIDTH (its end, its tag or its last
//     columns out of view); nothing sticks out of the text column, and the page is no wider than
//     the viewport, at WIDTH and at the phone width NARROW. At NARROW a display or a table may
//     scroll inside its own box;
//   - screenshots of the top of the page (at most MAX_HEIGHT pixels) at both widths go to
//     SCREENSHOT_DIR/1280/ and SCREENSHOT_DIR/390/.
// Prints one line per page and a JSON summary on the last line; exits 1 if any page has a problem.
// Chromium: $CHROMIUM, or /usr/bin/chromium (Debian package `chromium`).

import { existsSync, mkdirSync, readdirSync, readFileSync, statSync } from "node:fs";
import { join, relative, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { chromium } from "playwright-core";

const WIDTH = 1280;
const NARROW = 390;
const MAX_HEIGHT = 6000;
const LOCAL = /^(file|data|blob|about):/;
const MIN_TEXT = 9; // pixels: the smallest figure text a reader must be able to read at WIDTH
const TEXT_KEY = "Smallest text (px)"; // written by scripts/figure_text.py

// The tEXt chunks of a PNG file, as {keyword: text}.
function pngText(path) {
  const data = readFileSync(path);
  const chunks = {};
  for (let offset = 8; offset + 8 <= data.length; ) {
    const length = data.readUInt32BE(offset);
    const type = data.toString("latin1", offset + 4, offset + 8);
    if (type === "tEXt") {
      const body = data.subarray(offset + 8, offset + 8 + length);
      const nul = body.indexOf(0);
      chunks[body.toString("latin1", 0, nul)] = body.toString("latin1", nul + 1);
    }
    if (type === "IEND") break;
    offset += 12 + length;
  }
  return chunks;
}

// The smallest text of each figure on screen, and the problems with it:
// figures = [{src, file, natural, rendered}].
function figureText(figures) {
  const problems = [];
  const sizes = {};
  for (const { src, file, natural, rendered } of figures) {
    if (!existsSync(file)) continue; // a missing image is reported as a failed request
    const recorded = Number.parseFloat(pngText(file)[TEXT_KEY]);
    if (!(recorded > 0)) {
      problems.push(`figure without a "${TEXT_KEY}" record (scripts/figure_text.py): ${src}`);
      continue;
    }
    const shown = (rendered / natural) * recorded;
    sizes[src] = Math.round(shown * 10) / 10;
    if (!(shown >= MIN_TEXT)) {
      problems.push(
        `figure text ${shown.toFixed(1)} px < ${MIN_TEXT} px at ${WIDTH} px: ${src} ` +
          `(${recorded} px in the image, shown at ${Math.round(rendered)} of ${natural} px)`,
      );
    }
  }
  return { problems, sizes };
}

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
      // Each figure's file, natural width and width on screen.
      figures: [...document.querySelectorAll('img[src*="figures/"]')].map((img) => ({
        src: img.getAttribute("src"),
        url: img.src,
        natural: img.naturalWidth,
        rendered: img.getBoundingClientRect().width,
      })),
      height: document.documentElement.scrollHeight,
    };
  });
  for (const src of found.uncaptioned) problems.push(`figure without a caption: ${src}`);
  const figures = found.figures
    .filter(({ url }) => url.startsWith("file:"))
    .map((figure) => ({ ...figure, file: fileURLToPath(figure.url) }));
  const text = figureText(figures);
  problems.push(...text.problems);

  // Overflow: displays that scroll (their end and tag out of view), elements that stick out of
  // the text column (not inside a box of their own that scrolls or clips), and a page wider
  // than the viewport.
  const overflow = async () =>
    page.evaluate(() => {
      const column = document.querySelector(".md-content");
      const right = column ? column.getBoundingClientRect().right : Infinity;
      const clipped = (el) => {
        for (let up = el.parentElement; up && up !== column; up = up.parentElement) {
          if (getComputedStyle(up).overflowX !== "visible") return true;
        }
        return false;
      };
      const outside = column
        ? [...column.querySelectorAll("*")].filter((el) => {
            const box = el.getBoundingClientRect();
            return box.width > 0 && box.right > right + 1 && !clipped(el);
          })
        : [];
      return {
        page: document.documentElement.scrollWidth - document.documentElement.clientWidth,
        displays: [...document.querySelectorAll(".md-typeset div.arithmatex")]
          .filter((div) => div.scrollWidth > div.clientWidth + 1)
          .map((div) => div.querySelector(".tag")?.textContent || div.textContent.slice(0, 40)),
        tables: [...document.querySelectorAll(".md-typeset__scrollwrap")]
          .filter((wrap) => wrap.scrollWidth > wrap.clientWidth + 1)
          .map((wrap) => wrap.querySelector("th")?.textContent.trim() || "(no heading)"),
        // The outermost of each run of elements that stick out.
        outside: outside
          .filter((el) => !outside.includes(el.parentElement))
          .map((el) => `<${el.tagName.toLowerCase()}> ${el.textContent.trim().slice(0, 60)}`),
      };
    });
  const wide = await overflow();
  for (const display of wide.displays) problems.push(`display scrolls at ${WIDTH} px: ${display}`);
  for (const table of wide.tables) {
    problems.push(`table scrolls at ${WIDTH} px (columns out of view): first heading "${table}"`);
  }
  for (const el of wide.outside) {
    problems.push(`sticks out of the text column at ${WIDTH} px: ${el}`);
  }
  if (wide.page > 1) {
    problems.push(`page is ${wide.page} px wider than the viewport at ${WIDTH} px`);
  }
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
  const screenshot = async (width) => {
    const height = await page.evaluate(() => document.documentElement.scrollHeight);
    await page.screenshot({
      path: join(screenshots, String(width), name),
      fullPage: true,
      clip: { x: 0, y: 0, width, height: Math.min(height, MAX_HEIGHT) },
    });
  };
  await screenshot(WIDTH);
  await page.setViewportSize({ width: NARROW, height: 900 });
  await page.evaluate(() => document.fonts.ready);
  const narrow = await overflow();
  for (const el of narrow.outside) {
    problems.push(`sticks out of the text column at ${NARROW} px: ${el}`);
  }
  if (narrow.page > 1) {
    problems.push(`page is ${narrow.page} px wider than the viewport at ${NARROW} px`);
  }
  await screenshot(NARROW);
  await page.close();
  const result = { page: relative(site, file), formulas: found.formulas, problems };
  return { ...result, figureText: text.sizes };
}

async function main() {
  const [siteArg, shotsArg] = process.argv.slice(2);
  if (!siteArg || !shotsArg) {
    console.error("usage: node scripts/check_site.mjs SITE_DIR SCREENSHOT_DIR");
    process.exit(2);
  }
  const site = resolve(siteArg);
  const screenshots = resolve(shotsArg);
  for (const width of [WIDTH, NARROW]) {
    mkdirSync(join(screenshots, String(width)), { recursive: true });
  }
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

  for (const { page, formulas, problems } of results) {
    console.log(`${problems.length ? "FAIL" : "ok  "} ${page} (${formulas} formulas)`);
    for (const problem of problems) console.log(`     ${problem}`);
  }
  const failed = results.filter((r) => r.problems.length > 0).length;
  console.log(JSON.stringify({ pages: results.length, failed, screenshots, results }));
  process.exit(failed > 0 ? 1 : 0);
}

await main();
