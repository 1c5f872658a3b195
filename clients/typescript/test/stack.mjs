// A live stack for the tests: `windflow up --workers 1` from the repo's venv
// (authenticating: its development token), or the bridge at WINDFLOW_BRIDGE_URL.
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const PACKAGE = resolve(dirname(fileURLToPath(import.meta.url)), "..");
export const ROOT = resolve(PACKAGE, "../..");
const START_TIMEOUT_MS = 180_000;
const STOP_TIMEOUT_MS = 30_000;

/** Start `windflow up`: `{ ready: Promise<{url, token}>, stop(keepLogs), logs() }`. */
export function startStack() {
  const windflow = process.env.WINDFLOW_BIN || join(ROOT, ".venv", "bin", "windflow");
  if (!existsSync(windflow)) throw new Error(`no ${windflow}: run \`make venv\` (or set WINDFLOW_BIN)`);
  const stateDir = mkdtempSync(join(tmpdir(), "windflow-ts-"));
  const child = spawn(windflow, ["up", "--workers", "1", "--state-dir", stateDir], {
    cwd: ROOT,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  const ready = new Promise((resolveReady, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`windflow up was not ready in ${START_TIMEOUT_MS / 1000} s:\n${stderr.slice(-4000)}`)),
      START_TIMEOUT_MS,
    );
    const check = () => {
      const page = /play in a browser at (http:\/\/\S+?)\?token=(\S+)/.exec(stderr);
      if (/windflow ready/.test(stdout) && page) {
        clearTimeout(timer);
        const tokenFile = join(stateDir, "token");
        const token = existsSync(tokenFile) ? readFileSync(tokenFile, "utf8").trim() : page[2];
        resolveReady({ url: page[1], token });
      }
    };
    child.stdout.on("data", (chunk) => {
      stdout += chunk;
      check();
    });
    child.stderr.on("data", (chunk) => {
      stderr += chunk;
      if (stderr.length > 200_000) stderr = stderr.slice(-100_000);
      check();
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`windflow up exited (${code}) before it was ready:\n${stderr.slice(-4000)}`));
    });
  });
  const stop = async (keepLogs = false) => {
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((done) => child.once("exit", done));
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), STOP_TIMEOUT_MS);
      await exited;
      clearTimeout(timer);
    }
    if (keepLogs) console.error(`windflow up's logs are kept in ${join(stateDir, "logs")}`);
    else rmSync(stateDir, { recursive: true, force: true });
  };
  return { ready, stop, logs: () => stderr };
}
