// vloop-feedback.js: wires an answer shown on a page to the vloop gateway's feedback API.
// A plain ES module (no build step, no dependency), served by the gateway at /sdk/vloop-feedback.js.
//
//   import vloop from "https://gateway.example/sdk/vloop-feedback.js";
//   vloop.configure({ apiKey: "..." });           // only if the gateway has VLOOP_API_KEYS
//   const t = vloop.track(completion, answerElement);
//   acceptButton.onclick = () => t.accept();
//   saveButton.onclick = () => t.edit(textarea.value);
//
// `completion` is the chat completion the gateway returned (its `id` and `vloop.feedback_token`).
// What it sends: accept, edit, regenerate, rating, skip when the app calls them; `dwell` (ms the
// answer was on screen in a visible tab) and `close` when the page goes away (pagehide), with
// navigator.sendBeacon, which survives the page closing but cannot set headers: so the token (and
// the API key, if any) travel in the body. Every event has an id; a retry sends the same id and
// the gateway logs it once.

const settings = {
  // The gateway this script was loaded from, unless configured otherwise.
  endpoint: new URL(import.meta.url).origin,
  apiKey: null,
  retries: 3, // network failures and 5xx; a 4xx is final
};

export function configure(options = {}) {
  Object.assign(settings, options);
  if (settings.endpoint) settings.endpoint = String(settings.endpoint).replace(/\/+$/, "");
  return { ...settings, apiKey: settings.apiKey ? "****" : null };
}

function randomId() {
  // crypto.getRandomValues works on plain http pages too (randomUUID needs a secure context).
  const b = new Uint8Array(12);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function post(body) {
  const headers = { "Content-Type": "application/json" };
  if (settings.apiKey) headers.Authorization = `Bearer ${settings.apiKey}`;
  let last;
  for (let attempt = 0; attempt <= settings.retries; attempt++) {
    if (attempt) await sleep(250 * 2 ** attempt);
    try {
      const r = await fetch(`${settings.endpoint}/v1/feedback`, {
        method: "POST", headers, body: JSON.stringify(body), keepalive: true,
      });
      if (r.ok) return r.json();
      last = new Error(`feedback refused: ${r.status} ${await r.text()}`);
      if (r.status < 500) break; // the same body would be refused again
    } catch (e) {
      last = e; // offline or the connection dropped: the same event id makes a retry safe
    }
  }
  throw last;
}

function beacon(body) {
  if (settings.apiKey) body = { ...body, api_key: settings.apiKey };
  const data = JSON.stringify(body);
  // A string is sent as text/plain, which needs no CORS preflight (a beacon cannot wait for one).
  if (navigator.sendBeacon && navigator.sendBeacon(`${settings.endpoint}/v1/feedback`, data)) return;
  fetch(`${settings.endpoint}/v1/feedback`, { method: "POST", body: data, keepalive: true }).catch(() => {});
}

export class Tracker {
  constructor(response, element) {
    const requestId = response && (response.id || response.request_id);
    const token = response && ((response.vloop && response.vloop.feedback_token) || response.feedback_token);
    if (!requestId || !token) throw new Error("vloop.track needs the gateway's answer: its id and vloop.feedback_token");
    this.requestId = requestId;
    this.token = token;
    this.element = element || null;
    this.prefix = randomId();
    this.counter = 0;
    this.visibleMs = 0;
    this.visibleSince = null;
    this.intersecting = !element; // without an element, the tab's visibility alone counts
    this.closed = false;
    this._onVisibility = () => this._update();
    this._onPageHide = () => this._pageHide();
    document.addEventListener("visibilitychange", this._onVisibility);
    window.addEventListener("pagehide", this._onPageHide);
    if (element && "IntersectionObserver" in window) {
      this.observer = new IntersectionObserver((entries) => {
        for (const e of entries) this.intersecting = e.isIntersecting;
        this._update();
      }, { threshold: 0.5 });
      this.observer.observe(element);
    } else {
      this.intersecting = true;
    }
    this._update();
  }

  // Time on screen: counted while the answer is at least half in view and the tab is visible.
  _update() {
    const visible = this.intersecting && document.visibilityState === "visible";
    const now = performance.now();
    if (visible && this.visibleSince === null) this.visibleSince = now;
    if (!visible && this.visibleSince !== null) {
      this.visibleMs += now - this.visibleSince;
      this.visibleSince = null;
    }
  }

  dwellMs() {
    return Math.round(this.visibleMs + (this.visibleSince !== null ? performance.now() - this.visibleSince : 0));
  }

  _event(type, fields = {}, eventId = null) {
    return {
      request_id: this.requestId, feedback_token: this.token, type, ...fields,
      event_id: eventId || `${this.prefix}-${type}-${++this.counter}`,
    };
  }

  send(type, fields = {}) {
    return post(this._event(type, fields));
  }

  accept() { return this.send("accept"); }
  edit(text) { return this.send("edit", { edited_text: String(text) }); }
  regenerate() { return this.send("regenerate"); }
  skip() { return this.send("skip"); }
  rate(stars) { return this.send("rating", { rating: Math.round(Number(stars)) }); }

  // The page is going away: what the user saw and that they left, once each (fixed event ids,
  // so a page restored from the back-forward cache and hidden again does not count twice).
  _pageHide() {
    if (this.closed) return;
    this.closed = true;
    this._update();
    const ms = this.dwellMs();
    if (ms > 0) beacon(this._event("dwell", { dwell_ms: ms }, `${this.prefix}-dwell`));
    beacon(this._event("close", {}, `${this.prefix}-close`));
  }

  // Stop watching (the answer left the page without the page closing); sends nothing.
  stop() {
    this.closed = true;
    if (this.observer) this.observer.disconnect();
    document.removeEventListener("visibilitychange", this._onVisibility);
    window.removeEventListener("pagehide", this._onPageHide);
  }
}

export function track(response, element) {
  return new Tracker(response, element);
}

const vloop = { configure, track, Tracker };
export default vloop;
