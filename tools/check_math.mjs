// Check that every formula in the docs renders with KaTeX in strict mode.
//
// Usage: node tools/check_math.mjs [FILE_OR_DIR ...]   (default: docs)
//
// Math is delimited as pymdownx.arithmatex (generic mode) reads it: `$$ ... $$` for display
// (may span lines) and `$...$` inline, with no space just inside the dollars (it may wrap
// onto the next line of its paragraph, not past a blank line). Fenced code
// blocks and inline code spans are not math. A `$` left over once the math is taken out is
// reported too: arithmatex would print it as text, so it is almost always a typo.
//
// Prints `file:line: message` for each broken formula and exits 1 if there is any; otherwise
// prints one summary line and exits 0. Exit 2 for a usage error (no Markdown file found).

import { readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import katex from "katex";

const OPTIONS = { throwOnError: true, strict: "error", trust: false };

function markdownFiles(target) {
  if (statSync(target).isDirectory()) {
    return readdirSync(target)
      .sort()
      .flatMap((name) => markdownFiles(join(target, name)));
  }
  return target.endsWith(".md") ? [target] : [];
}

// Blank out what is not prose (fenced code and inline code), keeping offsets and newlines so
// line numbers stay right.
function maskCode(text) {
  const lines = text.split("\n");
  let fence = null;
  return lines
    .map((line) => {
      const opener = line.match(/^\s*(`{3,}|~{3,})/);
      if (fence === null && opener) {
        fence = opener[1];
        return " ".repeat(line.length);
      }
      if (fence !== null) {
        if (line.trim().startsWith(fence) && line.trim().replaceAll(fence[0], "") === "") {
          fence = null;
        }
        return " ".repeat(line.length);
      }
      return line.replace(/(`+)(?:(?!\1)[\s\S])*?\1/g, (span) => " ".repeat(span.length));
    })
    .join("\n");
}

function lineOf(text, offset) {
  let line = 1;
  for (let i = 0; i < offset; i++) if (text[i] === "\n") line++;
  return line;
}

// Returns [{tex, display, offset}] and blanks the formulas out of `masked`.
function formulas(masked) {
  const found = [];
  // Keep newlines so that offsets still give the right line.
  const blank = (match) => match.replace(/[^\n]/g, " ");
  let rest = masked.replace(/\$\$([\s\S]+?)\$\$/g, (match, tex, offset) => {
    found.push({ tex, display: true, offset });
    return blank(match);
  });
  rest = rest.replace(/(?<![\\$])\$(?![\s$])((?:\\.|[^\\$\n]|\n(?![ \t]*\n))+?)(?<!\s)\$(?!\$)/g, (match, tex, offset) => {
    found.push({ tex, display: false, offset });
    return blank(match);
  });
  return { found, rest };
}

function check(file) {
  const text = readFileSync(file, "utf8");
  const { found, rest } = formulas(maskCode(text));
  const errors = [];
  for (const { tex, display, offset } of found) {
    try {
      katex.renderToString(tex, { ...OPTIONS, displayMode: display });
    } catch (error) {
      const message = String(error.message ?? error).split("\n")[0];
      errors.push({ line: lineOf(text, offset), message: `${message}\n    ${tex.trim()}` });
    }
  }
  for (const match of rest.matchAll(/(?<!\\)\$/g)) {
    errors.push({
      line: lineOf(text, match.index),
      message:
        "unmatched '$' (inline math is $x$, with no space just inside the dollars; " +
        "display math is $$...$$)",
    });
  }
  errors.sort((a, b) => a.line - b.line);
  return { count: found.length, errors: errors.map((e) => `${file}:${e.line}: ${e.message}`) };
}

const targets = process.argv.length > 2 ? process.argv.slice(2) : ["docs"];
const files = targets.flatMap(markdownFiles);
if (files.length === 0) {
  console.error(`check_math: no Markdown files in ${targets.join(", ")}`);
  process.exit(2);
}
let total = 0;
const errors = [];
for (const file of files) {
  const result = check(file);
  total += result.count;
  errors.push(...result.errors);
}
if (errors.length > 0) {
  console.error(errors.join("\n"));
  console.error(`check_math: ${errors.length} error(s) in ${files.length} file(s)`);
  process.exit(1);
}
console.log(`check_math: ${total} formulas in ${files.length} file(s) render under KaTeX strict`);
