// app.js - the console's entry: sign-in, the router (#/...), the header.
import { h, clear } from "./dom.js";
import * as api from "./api.js";

const main = document.getElementById("main");

function signIn(message) {
  clear(main);
  const input = h("input", { type: "password", id: "token", name: "token", autocomplete: "off",
                             spellcheck: "false", "aria-describedby": "token-help", required: true });
  const err = h("p", { class: "error-text", id: "signin-error", role: "alert" }, message || "");
  const form = h("form", { class: "card signin", id: "signin", onsubmit: (e) => {
    e.preventDefault();
    api.setToken(input.value.trim());
    location.hash = "#/runs";
    route();
  } },
    h("h1", {}, "Sign in to kpl"),
    h("label", { for: "token" }, "Token"),
    input,
    h("p", { id: "token-help", class: "muted" },
      "Paste a token made with kplctl token create. It is kept in this tab only (sessionStorage) and sent as a header."),
    err,
    h("button", { type: "submit", class: "primary" }, "Sign in"));
  main.append(form);
  input.focus();
}

export function route() {
  if (!api.token()) {
    signIn();
    return;
  }
  clear(main);
  main.append(h("h1", {}, "Runs"));
}

window.addEventListener("hashchange", route);
route();
