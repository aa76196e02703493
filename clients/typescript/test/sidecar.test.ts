// Unit tests of the sidecar client against a stand-in answering as the sidecar does.
import { test } from "node:test";
import assert from "node:assert/strict";
import { SidecarClient, SidecarError } from "../src/index.js";

/** A `fetch` answering each path with a canned response, recording the requests. */
function standIn(answers: Record<string, () => Response>) {
  const seen: { url: string; method: string; auth: string | null }[] = [];
  const fetch = async (input: string | URL | Request, init?: RequestInit) => {
    const url = String(input);
    const headers = new Headers(init?.headers);
    seen.push({ url, method: init?.method ?? "GET", auth: headers.get("authorization") });
    const answer = answers[new URL(url).pathname];
    return answer ? answer() : new Response("not found", { status: 404 });
  };
  return { fetch: fetch as typeof globalThis.fetch, seen };
}

const json = (status: number, body: unknown, headers: Record<string, string> = {}) =>
  new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json", ...headers } });

test("credentials: ready, pending, and refusals with their code", async () => {
  const creds = {
    homeserver_url: "https://matrix.example.com",
    user_id: "@alice:example.com",
    access_token: "syt_x",
    expires_at: "2026-12-06T12:00:00Z",
    expires_in: 3600,
  };
  let answer = () => json(200, creds);
  const { fetch, seen } = standIn({ "/api/v1/credentials": () => answer() });
  const client = new SidecarClient("https://sidecar.example.com/", { fetch });
  assert.deepEqual(await client.credentials("jwt"), { status: "ready", credentials: creds });
  assert.deepEqual(seen[0], { url: "https://sidecar.example.com/api/v1/credentials", method: "POST", auth: "Bearer jwt" });

  answer = () => json(202, { error: "account_pending", message: "being prepared" }, { "retry-after": "2" });
  assert.deepEqual(await client.credentials("jwt"), { status: "pending", retryAfterSeconds: 2 });

  answer = () => json(403, { error: "user_locked", message: "the account is locked" });
  await assert.rejects(client.credentials("jwt"), (e: unknown) => {
    assert.ok(e instanceof SidecarError);
    assert.equal(e.status, 403);
    assert.equal(e.code, "user_locked");
    return true;
  });

  answer = () => json(429, { error: "rate_limited", message: "slow down" }, { "retry-after": "7" });
  await assert.rejects(client.credentials("jwt"), (e: unknown) => e instanceof SidecarError && e.retryAfterSeconds === 7);

  answer = () => new Response("<html>bad gateway</html>", { status: 502 });
  await assert.rejects(client.credentials("jwt"), (e: unknown) => e instanceof SidecarError && e.code === "unexpected");
});

test("handles: the status, with a reason when invalid, the localpart encoded", async () => {
  const { fetch, seen } = standIn({
    "/api/v1/handles/john.doe": () => json(200, { status: "available" }),
    "/api/v1/handles/_x": () => json(200, { status: "invalid", reason: "leading_underscore" }),
    "/api/v1/handles/a%2Fb": () => json(200, { status: "taken" }),
  });
  const client = new SidecarClient("https://sidecar.example.com", { fetch });
  assert.deepEqual(await client.handle("jwt", "john.doe"), { status: "available" });
  assert.deepEqual(await client.handle("jwt", "_x"), { status: "invalid", reason: "leading_underscore" });
  assert.deepEqual(await client.handle("jwt", "a/b"), { status: "taken" });
  assert.equal(seen[2].url, "https://sidecar.example.com/api/v1/handles/a%2Fb");
});
