// The seed's frontend, reduced to what it does with Barnum's realtime
// endpoint: io(URL, {auth: {token}}) with socket.io-client 4.x defaults
// (long-polling, then the websocket upgrade), join:conversation, listen.
//
//   node socketio_client.cjs URL TOKEN CONTACT_ID
//
// Prints one JSON line per step on stdout: {"step": "refused"|"joined"|
// "message:new"|"transport", …}; exits 0 after the first message:new, 1 on
// any error or after 60 s.  SOCKETIO_CLIENT_DIR: where socket.io-client@4
// is installed (scripts/e2e-socketio).
"use strict";
const path = require("path");
const { io } = require(path.join(process.env.SOCKETIO_CLIENT_DIR, "node_modules", "socket.io-client"));

const [url, token, contactId] = process.argv.slice(2);
const say = (doc) => process.stdout.write(JSON.stringify(doc) + "\n");
const fail = (why) => { say({ step: "error", why: String(why) }); process.exit(1); };
setTimeout(() => fail("timed out"), 60000).unref();

// A wrong token first: connect_error, never connected.
const bad = io(url, { auth: { token: "bnt_" + "x".repeat(43) }, reconnection: false });
bad.on("connect", () => fail("connected with a wrong token"));
bad.on("connect_error", (err) => {
  say({ step: "refused", message: err.message, data: err.data });
  bad.close();
  const socket = io(url, { auth: { token }, reconnection: false });
  socket.on("connect_error", (e) => fail("connect_error: " + e.message));
  socket.on("connect", () => {
    socket.emit("join:conversation", contactId, (joined) => {
      if (joined !== true) fail("join refused");
      say({ step: "joined", transport: socket.io.engine.transport.name });
    });
  });
  socket.io.engine.on("upgrade", (t) => say({ step: "transport", name: t.name }));
  socket.on("message:new", (data) => {
    say({ step: "message:new", data, transport: socket.io.engine.transport.name });
    socket.close();
    process.exit(0);
  });
});
