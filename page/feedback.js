// "Right / wrong" after a reading: the page's correction of the model, sent to POST /feedback with the very
// image /predict read. On "wrong", a grid of the model's classes (GET /feedback, with readings where the
// service has them) to pick the right one from. It watches the page's /predict calls instead of changing
// page.js: each answered single read offers feedback for that image.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const originalFetch = window.fetch.bind(window);
  let offered = null; // {image, prediction, version} of the reading shown
  let latest = 0; // the newest /predict sent: an older answer never replaces its offer
  let classes = null; // [{index, char, codepoint, reading?}], fetched on the first "wrong"

  function el(tag, className, text, attributes) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
    return node;
  }

  function tell(text) {
    $("fb-status").textContent = text;
  }

  function offer(image, body) {
    const top = body.predictions && body.predictions[0];
    if (!top || !$("feedback")) return;
    offered = { image, prediction: top, version: body.model_version };
    $("fb-choices").hidden = true;
    $("fb-right").disabled = $("fb-wrong").disabled = false;
    tell("");
    $("feedback").hidden = false;
  }

  window.fetch = async (input, init) => {
    const path = typeof input === "string" ? input : input.url;
    const single = path === "/predict" && init && init.body instanceof FormData && init.body.get("image");
    const id = single ? ++latest : 0;
    const response = await originalFetch(input, init);
    if (single && response.ok) {
      response.clone().json().then((body) => { if (id === latest) offer(init.body.get("image"), body); },
                                    () => {});
    }
    return response;
  };

  async function send(label) {
    if (!offered) return;
    const data = new FormData();
    data.append("image", offered.image, offered.image.name || "drawing.png");
    data.append("label", String(label));
    data.append("predicted", String(offered.prediction.index));
    if (offered.version) data.append("model_version", String(offered.version));
    $("fb-right").disabled = $("fb-wrong").disabled = true;
    tell("Sending…");
    try {
      const response = await originalFetch("/feedback", { method: "POST", body: data });
      const body = await response.json().catch(() => ({}));
      if (response.ok) {
        tell(body.duplicate ? `Already saved (#${body.id}): thank you.` : `Saved as #${body.id} (${body.char}): thank you.`);
        $("fb-choices").hidden = true;
        return;
      }
      tell((body.error && body.error.message) || `HTTP ${response.status}`);
    } catch (failure) {
      tell(`the service did not answer (${failure.message})`);
    }
    $("fb-right").disabled = $("fb-wrong").disabled = false;
  }

  function choice(entry) {
    const button = el("button", "choice", undefined,
                      { type: "button", "aria-label": `${entry.char}${entry.reading ? ` (${entry.reading})` : ""}` });
    button.append(el("span", "char", entry.char, { lang: "ja" }));
    if (entry.reading) button.append(el("span", "reading", entry.reading));
    button.addEventListener("click", () => send(entry.index));
    return button;
  }

  async function showChoices() {
    if (!classes) {
      tell("Loading the classes…");
      try {
        classes = (await (await originalFetch("/feedback")).json()).classes;
      } catch (failure) {
        tell(`the classes did not load (${failure.message})`);
        return;
      }
    }
    tell("Which character is it?");
    $("fb-choices").replaceChildren(...classes.map(choice));
    $("fb-choices").hidden = false;
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (!$("feedback")) return;
    $("fb-right").addEventListener("click", () => offered && send(offered.prediction.index));
    $("fb-wrong").addEventListener("click", showChoices);
  });
})();
