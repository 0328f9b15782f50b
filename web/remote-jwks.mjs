// A token verifier that knows storegate only by its discovery URL, as a
// gateway or another service written in JavaScript would be: it reads
// /.well-known/openid-configuration, then verifies each token with jose's
// remote key set at the document's jwks_uri (fetched when a token names a
// key it has not seen, so a rotated key is picked up).
//
//   node remote-jwks.mjs <discovery URL> <audience>
//
// One token per line on standard input; one line of JSON per token on
// standard output: {"ok":true,"claims":{…},"kid":"…"} or {"ok":false,"error":"…"}.
import { createInterface } from "node:readline";
import { createRemoteJWKSet, jwtVerify } from "jose";

const [discoveryUrl, audience] = process.argv.slice(2);
if (!discoveryUrl || !audience) {
  console.error("usage: node remote-jwks.mjs <discovery URL> <audience>");
  process.exit(2);
}

const discovery = await (await fetch(discoveryUrl)).json();
// No cooldown between fetches: a test rotates the key right away.
const keys = createRemoteJWKSet(new URL(discovery.jwks_uri), { cooldownDuration: 0 });

for await (const token of createInterface({ input: process.stdin })) {
  try {
    const { payload, protectedHeader } = await jwtVerify(token.trim(), keys, {
      issuer: discovery.issuer,
      audience,
      algorithms: discovery.id_token_signing_alg_values_supported,
      typ: "at+jwt",
    });
    console.log(JSON.stringify({ ok: true, claims: payload, kid: protectedHeader.kid }));
  } catch (error) {
    console.log(JSON.stringify({ ok: false, error: String(error?.code ?? error) }));
  }
}
