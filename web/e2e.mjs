// End to end in a real browser: `storegate up` with CORS for this page's
// origin, the page served from a second origin, Debian's headless Chromium
// driven by Playwright through register → password → QR → code → products.
//
//   STOREGATE_BIN_DIR=../target/debug node e2e.mjs
import { execFileSync, spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

const here = path.dirname(new URL(import.meta.url).pathname);
const bin = path.resolve(process.env.STOREGATE_BIN_DIR ?? path.join(here, "../target/debug"));
const dist = path.join(here, "dist");
const work = fs.mkdtempSync(path.join(os.tmpdir(), "storegate-web-"));

function freePort() {
  return new Promise((resolve) => {
    const server = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** RFC 6238 code (SHA-1, 6 digits, 30 s) from a base32 secret, as an authenticator app computes it. */
function totp(secretBase32, now = Date.now()) {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  let bits = "";
  for (const c of secretBase32.replace(/=+$/, "")) bits += alphabet.indexOf(c).toString(2).padStart(5, "0");
  const key = Buffer.from(bits.match(/.{8}/g).map((b) => parseInt(b, 2)));
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(Math.floor(now / 1000 / 30)));
  const mac = createHmac("sha1", key).update(counter).digest();
  const offset = mac[mac.length - 1] & 0xf;
  return String((mac.readUInt32BE(offset) & 0x7fffffff) % 1_000_000).padStart(6, "0");
}

function assert(condition, message) {
  if (!condition) throw new Error(`assertion failed: ${message}`);
}

const page_server = http
  .createServer((request, response) => {
    const file = request.url.startsWith("/app.js") ? "app.js" : "index.html";
    const type = file.endsWith(".js") ? "text/javascript" : "text/html";
    response.writeHead(200, { "content-type": `${type}; charset=utf-8` });
    response.end(fs.readFileSync(path.join(dist, file)));
  })
  .listen(0, "127.0.0.1");
await new Promise((resolve) => page_server.once("listening", resolve));
const origin = `http://127.0.0.1:${page_server.address().port}`;

const [authPort, productPort] = [await freePort(), await freePort()];
const env = {
  ...process.env,
  DATABASE_URL: `sqlite://${work}/storegate.db`,
  CORS_ALLOWED_ORIGINS: origin,
  AUTH_SERVICE_URL: `http://127.0.0.1:${authPort}`,
  RUST_LOG: "warn",
};
const stack = spawn(
  path.join(bin, "storegate"),
  ["up", "--auth-listen-addr", `127.0.0.1:${authPort}`, "--product-listen-addr", `127.0.0.1:${productPort}`,
   "--metrics-listen-addr", "", "--product-metrics-listen-addr", ""],
  { env, stdio: ["ignore", "pipe", "inherit"] },
);
let browser;
try {
  await new Promise((resolve, reject) => {
    let seen = "";
    stack.stdout.on("data", (chunk) => {
      seen += chunk;
      if (seen.includes("product-service")) resolve();
    });
    stack.once("exit", (code) => reject(new Error(`storegate up exited with ${code}`)));
  });

  execFileSync(path.join(bin, "storegate"), ["register", "webshop", "--password-stdin"], {
    env,
    input: "correct horse battery\n",
  });
  execFileSync(path.join(bin, "auth-service"), ["grant-role", "webshop", "admin"], { env, stdio: "ignore" });

  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage();
  const consoleErrors = [];
  page.on("console", (message) => message.type() === "error" && consoleErrors.push(message.text()));
  await page.goto(`${origin}/?auth=http://127.0.0.1:${authPort}&products=http://127.0.0.1:${productPort}`);

  // A wrong password: the server's refusal shows, over gRPC-Web.
  await page.fill("#username", "webshop");
  await page.fill("#password", "not the password");
  await page.click("#login-button");
  await page.waitForFunction(() => document.getElementById("error").textContent.includes("Unauthenticated"));

  await page.fill("#password", "correct horse battery");
  await page.click("#login-button");
  await page.waitForSelector("#enrollment:not([hidden])");
  const qrWidth = await page.$eval("#qr", (img) => img.decode().then(() => img.naturalWidth));
  assert(qrWidth >= 200, `the QR code PNG renders (width ${qrWidth})`);
  const secret = (await page.textContent("#secret")).trim();
  assert(/^[A-Z2-7]{32}$/.test(secret), `a base32 secret: ${secret}`);

  await page.fill("#code", totp(secret));
  await page.click("#code-button");
  await page.waitForSelector("#catalogue:not([hidden])");

  await page.fill("#name", "Teapot from the browser");
  await page.fill("#price", "24.5");
  await page.fill("#stock", "3");
  await page.click("#create-button");
  await page.waitForSelector("#products tr");
  const row = await page.textContent("#products tr");
  assert(row.includes("Teapot from the browser") && row.includes("24.50"), `the new product is listed: ${row}`);
  assert((await page.textContent("#total")).startsWith("1 product"), "the total");

  await page.screenshot({ path: path.join(here, "screenshot.png"), fullPage: true });
  assert(consoleErrors.length === 0, `no console errors: ${consoleErrors.join("; ")}`);

  // CORS: another origin is refused by the browser.
  const foreign = await browser.newPage();
  await foreign.goto("about:blank");
  const blocked = await foreign.evaluate(async (url) => {
    try {
      await fetch(url, { method: "POST", headers: { "content-type": "application/grpc-web+proto" }, body: new Uint8Array(5) });
      return false;
    } catch {
      return true;
    }
  }, `http://127.0.0.1:${authPort}/storegate.auth.v1.AuthService/GetJwks`);
  assert(blocked, "a page from an origin not in CORS_ALLOWED_ORIGINS cannot read responses");

  console.log("web e2e: 1 passed, 0 failed");
} finally {
  await browser?.close();
  stack.kill("SIGTERM");
  page_server.close();
  fs.rmSync(work, { recursive: true, force: true });
}
