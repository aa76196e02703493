// A typed client for the sidecar's platform-facing APIs: the credential API
// and the handle API. Their types are generated from the sidecar's OpenAPI
// document (docs/sidecar-openapi.yaml) by openapi-typescript.
import type { components } from "./generated/sidecar.js";

export type Credentials = components["schemas"]["Credentials"];
export type Handle = components["schemas"]["Handle"];
export type SidecarErrorBody = components["schemas"]["Error"];

/** The sidecar refused: its HTTP status, stable code and message. */
export class SidecarError extends Error {
  constructor(
    readonly status: number,
    readonly code: SidecarErrorBody["error"] | "unexpected",
    message: string,
    /** Seconds to wait before asking again, when the sidecar says (429). */
    readonly retryAfterSeconds?: number,
  ) {
    super(`${status} ${code}: ${message}`);
    this.name = "SidecarError";
  }
}

/** What the credential API answered: a token, or that the account is still being prepared. */
export type CredentialsAnswer =
  | { status: "ready"; credentials: Credentials }
  | { status: "pending"; retryAfterSeconds: number };

export interface SidecarClientOptions {
  /** The `fetch` to use (default: the global one). */
  fetch?: typeof fetch;
}

export class SidecarClient {
  private readonly base: string;
  private readonly fetch: typeof fetch;

  /** `baseUrl`: the sidecar's HTTPS address (its issuer URL). */
  constructor(baseUrl: string, options: SidecarClientOptions = {}) {
    this.base = baseUrl.replace(/\/+$/, "");
    this.fetch = options.fetch ?? fetch;
  }

  /**
   * Matrix credentials for the bearer of `platformToken`: `ready` with a
   * token for the user's own account, or `pending` while the account is
   * being prepared (ask again after `retryAfterSeconds`). Refusals throw a
   * `SidecarError`.
   */
  async credentials(platformToken: string): Promise<CredentialsAnswer> {
    const response = await this.fetch(`${this.base}/api/v1/credentials`, {
      method: "POST",
      headers: { authorization: `Bearer ${platformToken}` },
    });
    if (response.status === 202) {
      return { status: "pending", retryAfterSeconds: retryAfter(response) ?? 1 };
    }
    if (response.status === 200) {
      return { status: "ready", credentials: (await response.json()) as Credentials };
    }
    throw await refusal(response);
  }

  /** Whether `localpart` is free for a new account (advice: the oldest claim wins). */
  async handle(platformToken: string, localpart: string): Promise<Handle> {
    const response = await this.fetch(`${this.base}/api/v1/handles/${encodeURIComponent(localpart)}`, {
      headers: { authorization: `Bearer ${platformToken}` },
    });
    if (response.status === 200) return (await response.json()) as Handle;
    throw await refusal(response);
  }
}

function retryAfter(response: Response): number | undefined {
  const value = Number(response.headers.get("retry-after"));
  return Number.isFinite(value) && value > 0 ? value : undefined;
}

async function refusal(response: Response): Promise<SidecarError> {
  const text = await response.text();
  try {
    const body = JSON.parse(text) as SidecarErrorBody;
    if (typeof body.error === "string") {
      return new SidecarError(response.status, body.error, body.message ?? "", retryAfter(response));
    }
  } catch {
    // Not the sidecar's JSON (a proxy's page): reported as it came.
  }
  return new SidecarError(response.status, "unexpected", text.slice(0, 200), retryAfter(response));
}
