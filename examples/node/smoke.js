// Calls every RPC of cacheaside once and prints what came back as one JSON object, for a test (or a
// person) to check. Usage: node smoke.js HOST:PORT [ADMIN_TOKEN]
"use strict";

const { createClient, loadService } = require("./client");

async function main() {
  const [target, token] = process.argv.slice(2);
  if (!target) throw new Error("usage: node smoke.js HOST:PORT [ADMIN_TOKEN]");
  const client = createClient(target, { token, timeoutMs: 5000 });
  const calls = {
    GetUser: { user_id: "alice", view: "USER_VIEW_FULL" },
    GetPost: { post_id: "p1" },
    GetTrending: { limit: 5 },
    GetArchived: {},
    ListPostsByAuthor: { author_id: "alice", limit: 10 },
    ListCommentsByAuthor: { author_id: "alice" },
    BatchGetUsers: { user_ids: ["alice", "bob"] },
    BatchGetPosts: { post_ids: ["p2", "p1"] },
    Invalidate: { post_ids: ["p1"], user_ids: ["alice"] },
    Warm: { popular_posts: 2, active_users: 2, active_within: { seconds: 3600 } },
    WarmWithProgress: { warm: { popular_posts: 2, active_users: 2 } },
  };
  const missing = Object.keys(loadService().service).filter((name) => !(name in calls));
  if (missing.length) throw new Error(`the smoke test does not call ${missing.join(", ")}`);

  const results = {};
  for (const [name, request] of Object.entries(calls)) {
    // x-cache-debug asks a read for its tier (x-cache-tier) as well.
    const metadata = { "x-request-id": `node-${name}`, "x-cache-debug": "1" };
    results[name] = await client[name](request, { metadata });
  }
  // A second GetPost: the cache answers it.
  results.GetPostAgain = await client.GetPost({ post_id: "p1" });
  try {
    await client.GetPost({ post_id: "nope" });
    results.NotFound = { code: 0 };
  } catch (error) {
    results.NotFound = { code: error.code, details: error.details, requestId: error.requestId };
  }
  client.close();
  process.stdout.write(JSON.stringify(results) + "\n");
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
