// The invite page (DESIGN.md §9a). Same origin as the client-server API, so no CORS.
// The token travels in the URL fragment, which browsers never send to a server.
"use strict";

(function () {
  const api = "/_matrix/client";
  const $ = (id) => document.getElementById(id);
  const status = $("status");
  const form = $("signup");
  const serverName = document.body.dataset.serverName;

  const say = (text, problem) => {
    status.textContent = text;
    status.classList.toggle("problem", !!problem);
  };

  const token = (() => {
    const raw = location.hash.replace(/^#/, "");
    try { return decodeURIComponent(raw).trim(); } catch (e) { return raw.trim(); }
  })();

  // What the front door tells about a token Synapse calls invalid (POST /invite/check).
  const WHY = {
    used: "This invite link has been used up. Ask the person who invited you for a new one.",
    expired: "This invite link has expired. Ask the person who invited you for a new one.",
    unknown: "This invite link is not known here: check that you copied all of it, or ask the person who invited you for a new one.",
  };

  async function json(method, path, body) {
    const opts = { method, headers: {}, credentials: "omit", cache: "no-store" };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const r = await fetch(path, opts);
    let data = {};
    try { data = await r.json(); } catch (e) { /* not JSON */ }
    return { status: r.status, data };
  }

  async function check() {
    say("Checking your invite…");
    if (!token) {
      say("This link has no invite code in it. Open the whole link you were sent, or ask for a new one.", true);
      return;
    }
    let r;
    try {
      // Matrix spec v1.2+: GET /_matrix/client/v1/register/m.login.registration_token/validity
      r = await json("GET", api + "/v1/register/m.login.registration_token/validity?token=" + encodeURIComponent(token));
    } catch (e) {
      say("The server cannot be reached right now. Check your connection and reload the page.", true);
      return;
    }
    if (r.status === 200 && r.data.valid === true) {
      say("Your invite is valid.");
      form.hidden = false;
      return;
    }
    if (r.status === 429) {
      say("Too many tries just now. Wait a minute and reload the page.", true);
      return;
    }
    let why = "unknown";
    try {
      const w = await json("POST", "/invite/check", { token });
      if (WHY[w.data.state]) why = w.data.state;
    } catch (e) { /* keep "unknown" */ }
    say(WHY[why], true);
  }

  // Username availability as typed (GET /_matrix/client/v3/register/available).
  const user = $("username");
  const userNote = $("username-note");
  let typed = 0;
  let userOk = false;
  user.addEventListener("input", () => {
    const mine = ++typed;
    userOk = false;
    const name = user.value.trim();
    if (!name) { userNote.textContent = ""; return; }
    setTimeout(async () => {
      if (mine !== typed) return;
      let r;
      try {
        r = await json("GET", api + "/v3/register/available?username=" + encodeURIComponent(name));
      } catch (e) { return; }
      if (mine !== typed) return;
      userOk = r.status === 200 && r.data.available === true;
      user.setAttribute("aria-invalid", userOk ? "false" : "true");
      if (userOk) userNote.textContent = "@" + name + ":" + serverName + " is available.";
      else if (r.data.errcode === "M_USER_IN_USE") userNote.textContent = "That username is taken: try another.";
      else if (r.data.errcode === "M_INVALID_USERNAME") userNote.textContent = "That username cannot be used: use lower-case letters, digits and . _ = - / only.";
      else if (r.data.errcode === "M_EXCLUSIVE") userNote.textContent = "That username is reserved: try another.";
      else userNote.textContent = r.data.error || "That username cannot be used: try another.";
    }, 300);
  });

  const pw = $("password");
  const pw2 = $("password2");
  const pwNote = $("password-note");
  const matchNote = () => {
    const same = pw.value === pw2.value;
    pwNote.textContent = pw2.value && !same ? "The two passwords differ." : "";
    pw2.setAttribute("aria-invalid", pw2.value && !same ? "true" : "false");
    return same;
  };
  pw.addEventListener("input", matchNote);
  pw2.addEventListener("input", matchNote);

  // Synapse's registration is user-interactive auth (Matrix spec "User-Interactive
  // Authentication API"): m.login.registration_token (MSC3231), then m.login.dummy.
  async function register(username, password) {
    const body = { username, password, inhibit_login: true, initial_device_display_name: "invite page" };
    let r = await json("POST", api + "/v3/register", body);
    for (let round = 0; round < 5 && r.status === 401 && r.data.flows; round++) {
      const done = r.data.completed || [];
      const flow = r.data.flows.find((f) => f.stages.every((s) => s === "m.login.registration_token" || s === "m.login.dummy"));
      if (!flow) throw new Error("This server asks for a sign-up step this page cannot do. Ask the server's admin.");
      const next = flow.stages.find((s) => !done.includes(s));
      if (!next) break;
      const auth = { type: next, session: r.data.session };
      if (next === "m.login.registration_token") auth.token = token;
      r = await json("POST", api + "/v3/register", { ...body, auth });
    }
    if (r.status === 200 && r.data.user_id) return r.data.user_id;
    const err = r.data.errcode;
    if (err === "M_USER_IN_USE") throw new Error("That username was just taken: pick another.");
    if (err === "M_WEAK_PASSWORD") throw new Error("That password is too weak: " + (r.data.error || "pick a longer one."));
    if (err === "M_UNAUTHORIZED" || err === "M_FORBIDDEN") throw new Error("The invite was not accepted: it may have just been used up or expired. Ask for a new one.");
    if (r.status === 429) throw new Error("Too many tries just now. Wait a minute and try again.");
    throw new Error((r.data.error || "Sign-up failed") + ". Try again, or ask the server's admin.");
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const username = user.value.trim();
    if (!username) { say("Type a username first.", true); user.focus(); return; }
    if (!pw.value) { say("Type a password first.", true); pw.focus(); return; }
    if (!matchNote()) { say("The two passwords differ: type the same password twice.", true); pw2.focus(); return; }
    const button = $("submit");
    button.disabled = true;
    say("Creating your account…");
    try {
      const mxid = await register(username, pw.value);
      form.hidden = true;
      $("mxid").textContent = mxid;
      $("done").hidden = false;
      say("Your account " + mxid + " is ready.");
      $("done-title").focus();
    } catch (e) {
      say(e.message, true);
      button.disabled = false;
    }
  });

  check();
})();
