// The server's public API, as the playground uses it: JSON requests with the pasted key, the
// chat stream (Server-Sent Events in OpenAI's chunk format), and readable errors.
// Everything goes to this page's own origin; the key lives in sessionStorage (this tab only).
"use strict";

(function () {
  const KEY_SLOT = "personalign.key";

  // An answer that is not 2xx: the status and the server's own message (and the field it names).
  class ApiError extends Error {
    constructor(status, message, param, code) {
      super(message);
      this.status = status;
      this.param = param || null;
      this.code = code || null;
    }

    // What the page shows: the status in words, the message, the field.
    describe() {
      const what = {
        0: "The server could not be reached",
        400: "The request was refused",
        401: "The API key was not accepted",
        403: "Not allowed",
        404: "Not found",
        409: "Conflict",
        413: "Too large",
        429: "The server is busy",
        503: "The server is unavailable",
      }[this.status] || `Error ${this.status}`;
      const field = this.param ? ` (field: ${this.param})` : "";
      return `${what}: ${this.message}${field}`;
    }
  }

  // The error in a response body ({"error": {"message", "param", "code"}}), or the status text.
  async function errorOf(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    const err = body && body.error ? body.error : {};
    const retry = response.headers.get("Retry-After");
    let message = err.message || response.statusText || "no message";
    if (retry) message += ` Retry in ${retry} s.`;
    return new ApiError(response.status, message, err.param, err.code);
  }

  const api = {
    ApiError,

    key() {
      return sessionStorage.getItem(KEY_SLOT) || "";
    },
    setKey(key) {
      sessionStorage.setItem(KEY_SLOT, key);
    },
    forgetKey() {
      sessionStorage.removeItem(KEY_SLOT);
    },

    // One JSON request; resolves to the parsed body, rejects with an ApiError.
    async request(method, path, body) {
      const headers = { Authorization: `Bearer ${api.key()}` };
      if (body !== undefined) headers["Content-Type"] = "application/json";
      let response;
      try {
        response = await fetch(path, {
          method,
          headers,
          body: body === undefined ? undefined : JSON.stringify(body),
          cache: "no-store",
        });
      } catch (e) {
        throw new ApiError(0, String(e.message || e));
      }
      if (!response.ok) throw await errorOf(response);
      return response.status === 204 ? null : response.json();
    },

    // GET /health needs no key.
    async health() {
      const response = await fetch("/health", { cache: "no-store" });
      if (!response.ok) throw await errorOf(response);
      return response.json();
    },

    // Every page of a paginated list (`limit`, `after`, `has_more`).
    async listAll(path) {
      const rows = [];
      let after = null;
      for (;;) {
        const sep = path.includes("?") ? "&" : "?";
        const url = `${path}${sep}limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`;
        const page = await api.request("GET", url);
        rows.push(...page.data);
        if (!page.has_more || !page.data.length) return rows;
        after = page.last_id;
      }
    },

    // POST /v1/chat/completions with stream: true. `onChunk(chunk)` gets each parsed chunk as it
    // arrives; resolves once the stream says [DONE]. An error before the stream starts rejects with
    // its ApiError; an error inside the stream (`data: {"error": ...}`) rejects the same way. `signal`
    // (an AbortSignal) stops it: the request is dropped, the server stops decoding, and the promise
    // rejects with an ApiError whose code is "stopped".
    async stream(body, onChunk, signal) {
      const stopped = () => new ApiError(0, "stopped before the reply was complete.", null, "stopped");
      let response;
      try {
        response = await fetch("/v1/chat/completions", {
          method: "POST",
          headers: { Authorization: `Bearer ${api.key()}`, "Content-Type": "application/json" },
          body: JSON.stringify({ ...body, stream: true }),
          cache: "no-store",
          signal,
        });
      } catch (e) {
        if (signal && signal.aborted) throw stopped();
        throw new ApiError(0, String(e.message || e));
      }
      if (!response.ok) throw await errorOf(response);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        let part;
        try {
          part = await reader.read();
        } catch (e) {
          if (signal && signal.aborted) throw stopped();
          throw new ApiError(0, String(e.message || e));
        }
        const { value, done } = part;
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        // Events are separated by a blank line; each of ours is one `data:` line.
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") return;
            const chunk = JSON.parse(data);
            if (chunk.error) {
              throw new ApiError(500, chunk.error.message, chunk.error.param, chunk.error.code);
            }
            onChunk(chunk);
          }
        }
      }
      throw new ApiError(0, "the stream ended before the reply was complete.");
    },
  };

  window.personalignApi = api;
})();
