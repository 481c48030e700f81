// Broadcast through replicast from Node.js, and print a receipt per replica.
//
//   npm ci --prefix examples/node
//   node examples/node/broadcast.js 127.0.0.1:7420 cache.invalidate user:42
//
// @grpc/proto-loader reads proto/ at run time: no code generation step.
// Exits 1 when the ack policy was not met (the status message names the
// replicas that missed it; the receipts are in its details, a
// google.rpc.Status, for clients that decode them).
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const protoDir = path.join(__dirname, "..", "..", "proto");
const definition = protoLoader.loadSync("replicast/v1/replicast.proto", {
  includeDirs: [protoDir],
  longs: String, // uint64 sequence numbers and incarnations as strings
  enums: String, // ACK_POLICY_ALL, not 1
  defaults: false,
});
const { Replicast } = grpc.loadPackageDefinition(definition).replicast.v1;

const [target = "127.0.0.1:7420", topic = "cache.invalidate", data = "user:42"] = process.argv.slice(2);
const client = new Replicast(target, grpc.credentials.createInsecure());
const metadata = new grpc.Metadata();
if (process.env.REPLICAST_TOKEN) metadata.set("authorization", `Bearer ${process.env.REPLICAST_TOKEN}`);

// The deadline also bounds how long the replica waits for acks; the id makes
// a retry safe (replicas deliver an id once).
client.Broadcast(
  { topic, payload: Buffer.from(data), ack: "ACK_POLICY_ALL", id: `node-${Date.now()}` },
  metadata,
  { deadline: new Date(Date.now() + 2000) },
  (err, response) => {
    if (err) {
      console.error(`broadcast failed: ${grpc.status[err.code]}: ${err.details}`);
      process.exit(1);
    }
    console.log(`message ${response.id}: ${response.acked} of ${response.replicas} replicas acknowledged`);
    for (const o of response.outcomes) {
      console.log(`  ${o.peer}  ${o.code ? grpc.status[o.code] + " " + o.message : "OK"}  seq=${o.sequence || "-"}`);
    }
    client.close();
  },
);
