// A cacheaside client for Node.js: the service's own proto, loaded at run time with @grpc/proto-loader,
// and the same production defaults as the Python CacheClient (deadline, UNAVAILABLE retries, keepalive).
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "protos");
const DEFAULT_TIMEOUT_MS = 10000;

// The same retry policy as client/client.py: gRPC retries UNAVAILABLE itself, within the deadline.
const SERVICE_CONFIG = JSON.stringify({
  methodConfig: [
    {
      name: [{ service: "cacheaside.v1.CacheService" }],
      retryPolicy: {
        maxAttempts: 4,
        initialBackoff: "0.1s",
        maxBackoff: "2s",
        backoffMultiplier: 2,
        retryableStatusCodes: ["UNAVAILABLE"],
      },
    },
  ],
});

function loadService() {
  const definition = protoLoader.loadSync("cacheaside/v1/cache_service.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the proto: user_id, not userId
    longs: String, // int64 (views, keys_invalidated) without losing precision
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).cacheaside.v1.CacheService;
}

// Each RPC as an async function (request, {metadata}) -> {response, cache, tier, requestId} (tier only
// when the metadata has x-cache-debug, any value); a server-streaming RPC (WarmWithProgress) resolves
// to {responses: [...], requestId} at its end.
function createClient(target, { token, timeoutMs = DEFAULT_TIMEOUT_MS, credentials } = {}) {
  const CacheService = loadService();
  const stub = new CacheService(target, credentials || grpc.credentials.createInsecure(), {
    "grpc.service_config": SERVICE_CONFIG,
    "grpc.keepalive_time_ms": 30000,
    "grpc.keepalive_timeout_ms": 10000,
  });
  const client = { close: () => stub.close() };
  for (const name of Object.keys(CacheService.service)) {
    if (CacheService.service[name].responseStream) {
      client[name] = (request, { metadata: extra = {} } = {}) =>
        new Promise((resolve, reject) => {
          const metadata = new grpc.Metadata();
          if (token) metadata.set("authorization", `Bearer ${token}`);
          for (const [key, value] of Object.entries(extra)) metadata.set(key, value);
          const responses = [];
          const call = stub[name](request, metadata, { deadline: Date.now() + 10 * timeoutMs });
          call.on("data", (response) => responses.push(response));
          call.on("error", reject);
          call.on("status", (status) => {
            if (status.code === grpc.status.OK) {
              resolve({ responses, requestId: status.metadata.get("x-request-id")[0] ?? null });
            }
          });
        });
      continue;
    }
    client[name] = (request, { metadata: extra = {} } = {}) =>
      new Promise((resolve, reject) => {
        const metadata = new grpc.Metadata();
        if (token) metadata.set("authorization", `Bearer ${token}`);
        for (const [key, value] of Object.entries(extra)) metadata.set(key, value);
        // The answer is complete with both the callback (response or error) and the status (trailers).
        const result = {};
        let answered = null;
        let trailers = null;
        const settle = () => {
          if (!answered || !trailers) return;
          result.requestId = trailers.get("x-request-id")[0] ?? null; // only the one sent, or on errors
          if (answered.error) {
            answered.error.requestId = result.requestId;
            reject(answered.error);
          } else {
            resolve({ response: answered.response, ...result });
          }
        };
        const call = stub[name](request, metadata, { deadline: Date.now() + timeoutMs }, (error, response) => {
          answered = { error, response };
          settle();
        });
        call.on("status", (status) => {
          trailers = status.metadata;
          result.cache = trailers.get("x-cache")[0];
          result.tier = trailers.get("x-cache-tier")[0]; // only when asked for with x-cache-debug
          settle();
        });
      });
  }
  return client;
}

module.exports = { createClient, loadService };
