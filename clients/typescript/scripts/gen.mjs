// Generate the TypeScript messages of the public API (protos/windflow/v1/windflow.proto)
// into src/gen/ with protoc-gen-es (target=ts), through the Python venv's grpc_tools
// protoc (the one tools/gen_protos.py uses). internal.proto is not public: never here.
//
//   node scripts/gen.mjs           # regenerate src/gen/
//   node scripts/gen.mjs --check   # exit 1 if the committed src/gen/ is stale
//
// The Python is $WINDFLOW_PYTHON, else <repo>/.venv/bin/python (`make venv`).
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, cpSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const PACKAGE = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const ROOT = resolve(PACKAGE, "../..");
const OUT = join(PACKAGE, "src", "gen");
const PROTOS = ["windflow/v1/windflow.proto"];

function files(dir) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { recursive: true })
    .map(String)
    .filter((name) => statSync(join(dir, name)).isFile())
    .sort();
}

function generate(out) {
  const python = process.env.WINDFLOW_PYTHON || join(ROOT, ".venv", "bin", "python");
  if (!existsSync(python)) {
    throw new Error(`no Python at ${python}: run \`make venv\` (or set WINDFLOW_PYTHON)`);
  }
  const plugin = join(PACKAGE, "node_modules", ".bin", "protoc-gen-es");
  if (!existsSync(plugin)) throw new Error(`no ${plugin}: run \`npm ci\` in ${PACKAGE}`);
  const include = spawnSync(
    python,
    ["-c", "import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), '_proto'))"],
    { encoding: "utf8" },
  );
  if (include.status !== 0) throw new Error(`grpc_tools is missing from ${python}: ${include.stderr}`);
  const run = spawnSync(
    python,
    [
      "-m", "grpc_tools.protoc",
      `--plugin=protoc-gen-es=${plugin}`,
      `--es_out=${out}`,
      "--es_opt=target=ts",
      `-I${join(ROOT, "protos")}`,
      `-I${include.stdout.trim()}`,
      ...PROTOS.map((p) => join(ROOT, "protos", p)),
    ],
    { encoding: "utf8", cwd: ROOT },
  );
  if (run.status !== 0) throw new Error(`protoc failed:\n${run.stderr}`);
}

const check = process.argv.includes("--check");
const tmp = mkdtempSync(join(tmpdir(), "windflow-gen-ts-"));
try {
  generate(tmp);
  const fresh = files(tmp);
  if (check) {
    const committed = files(OUT);
    const stale = [
      ...fresh.filter((f) => !committed.includes(f) || !readFileSync(join(tmp, f)).equals(readFileSync(join(OUT, f)))),
      ...committed.filter((f) => !fresh.includes(f)),
    ];
    if (stale.length) {
      console.error(
        "generated TypeScript is stale (protos/ changed); run `npm run gen` in clients/typescript:\n  " +
          stale.map((f) => relative(ROOT, join(OUT, f))).join("\n  "),
      );
      process.exit(1);
    }
    console.log(`generated TypeScript is up to date (${fresh.length} file${fresh.length === 1 ? "" : "s"})`);
  } else {
    rmSync(OUT, { recursive: true, force: true });
    cpSync(tmp, OUT, { recursive: true });
    console.log(`wrote ${fresh.length} file(s) under ${relative(ROOT, OUT)}`);
  }
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
