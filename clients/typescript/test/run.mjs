// Run the SDK's tests (build/test/*.test.mjs, built by scripts/build.mjs) against a live
// stack: `windflow up --workers 1` from the repo's venv (authenticating: its development
// token), stopped afterwards. With WINDFLOW_BRIDGE_URL (and WINDFLOW_TOKEN) set, against
// that bridge instead.
//
//   node test/run.mjs [node --test arguments...]
import { spawn } from "node:child_process";
import { existsSync, readdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { startStack } from "./stack.mjs";

const PACKAGE = resolve(dirname(fileURLToPath(import.meta.url)), "..");

async function main() {
  const testDir = join(PACKAGE, "build", "test");
  const files = existsSync(testDir)
    ? readdirSync(testDir).filter((f) => f.endsWith(".test.mjs")).map((f) => join(testDir, f))
    : [];
  if (files.length === 0) throw new Error(`no tests under ${testDir}: run \`npm run build\` first`);
  let env = { ...process.env };
  let stack;
  const started = Date.now();
  if (!env.WINDFLOW_BRIDGE_URL) {
    stack = startStack();
    const stop = () => void stack.stop().then(() => process.exit(130));
    process.once("SIGINT", stop);
    process.once("SIGTERM", stop);
    try {
      const { url, token } = await stack.ready;
      env = { ...env, WINDFLOW_BRIDGE_URL: url, WINDFLOW_TOKEN: token };
      console.log(`stack ready in ${((Date.now() - started) / 1000).toFixed(1)} s: bridge ${url}`);
    } catch (error) {
      await stack.stop(true);
      throw error;
    }
  }
  let code = 1;
  try {
    const test = spawn(process.execPath, ["--test", ...process.argv.slice(2), ...files], {
      env,
      stdio: "inherit",
    });
    code = await new Promise((done) => test.on("exit", (status, signal) => done(status ?? (signal ? 1 : 0))));
    if (code !== 0 && stack) console.error(`--- windflow up (last lines) ---\n${stack.logs().slice(-3000)}`);
  } finally {
    if (stack) await stack.stop(code !== 0);
  }
  console.log(`TypeScript SDK tests: ${code === 0 ? "passed" : "FAILED"} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  process.exit(code);
}

main().catch((error) => {
  console.error(error instanceof Error ? error.message : error);
  process.exit(1);
});
