// Build with esbuild:
//   dist/index.js                         the SDK, an ESM bundle for Node (deps external)
//   ../../services/bridge/static/app.js   the bridge's page (src/page/), committed
//   build/test/*.test.mjs                 the tests (test/*.test.ts), for node --test
//
//   node scripts/build.mjs           # build all three
//   node scripts/build.mjs --check   # exit 1 if the committed static/app.js is stale
import { build } from "esbuild";
import { existsSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const PACKAGE = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const ROOT = resolve(PACKAGE, "../..");
const PAGE_OUT = join(ROOT, "services", "bridge", "static", "app.js");

const page = {
  entryPoints: [join(PACKAGE, "src", "page", "main.ts")],
  bundle: true,
  format: "esm",
  platform: "browser",
  target: ["es2022"],
  minify: true,
  legalComments: "none",
  charset: "utf8",
  banner: {
    js: "// Built from clients/typescript/src/page/ by clients/typescript/scripts/build.mjs; do not edit.",
  },
  logLevel: "warning",
};

if (process.argv.includes("--check")) {
  const result = await build({ ...page, write: false, outfile: PAGE_OUT });
  const fresh = result.outputFiles[0].contents;
  const committed = existsSync(PAGE_OUT) ? readFileSync(PAGE_OUT) : Buffer.alloc(0);
  if (!Buffer.from(fresh).equals(committed)) {
    console.error(
      `${relative(ROOT, PAGE_OUT)} is stale (its sources changed); run \`npm run build\` in clients/typescript`,
    );
    process.exit(1);
  }
  console.log(`${relative(ROOT, PAGE_OUT)} is up to date (${fresh.length} bytes)`);
  process.exit(0);
}

await build({ ...page, outfile: PAGE_OUT });
await build({
  entryPoints: [join(PACKAGE, "src", "index.ts")],
  bundle: true,
  format: "esm",
  platform: "neutral",
  target: ["es2022"],
  packages: "external",
  sourcemap: true,
  outfile: join(PACKAGE, "dist", "index.js"),
  logLevel: "warning",
});
const tests = readdirSync(join(PACKAGE, "test")).filter((name) => name.endsWith(".test.ts"));
rmSync(join(PACKAGE, "build", "test"), { recursive: true, force: true });
await build({
  entryPoints: tests.map((name) => join(PACKAGE, "test", name)),
  bundle: true,
  format: "esm",
  platform: "node",
  target: ["node20"],
  packages: "external",
  sourcemap: "inline",
  outdir: join(PACKAGE, "build", "test"),
  outExtension: { ".js": ".mjs" },
  logLevel: "warning",
});
console.log(
  `built ${relative(ROOT, PAGE_OUT)}, ${relative(ROOT, join(PACKAGE, "dist", "index.js"))}, ` +
    `${tests.length} test file(s) under ${relative(ROOT, join(PACKAGE, "build", "test"))}`,
);
