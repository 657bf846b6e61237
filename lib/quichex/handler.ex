defmodule Quichex.Handler do
  @moduledoc """
  A behaviour for QUIC servers, in the style of `ThousandIsland.Handler`.

  `use Quichex.Handler` injects `@behaviour Quichex.Handler`, a default for
  every callback and `defoverridable`, so a handler implements only what it
  needs. Pass it to a listener:

      Quichex.Listener.start_link(port: 4433, config: config, handler: MyHandler, handler_options: [])

  ## Lifecycle

  For every connection the listener accepts:

  1. When the handshake completes, a **connection handler process** starts,
     linked to the connection, with `handler_options` as its state, and
     `c:handle_connection/2` runs in it. It is the connection's controlling
     process. (A connection whose handshake never completes costs no
     handler process.)
  2. Each stream the peer opens is served in **the stream's own process**
     (one process per stream), with `handler_options` as its initial
     state: `c:handle_stream_open/2` first, then `c:handle_data/3` for each
     chunk, then `c:handle_fin/2` when the peer finishes the stream or
     `c:handle_reset/3` when the peer resets it. `c:handle_stopped/3` runs
     when the peer asks us to stop sending (at any point; receiving goes
     on), `c:handle_info/3` for any other message. Each callback gets what
     arrived while the previous one ran; the stream reads at most about
     256 KB ahead of its callbacks, so a slow handler slows the peer through
     flow control.
  3. When the connection closes, `c:handle_close/3` runs in the connection
     handler process, which then exits; stream processes end with their
     streams or their connection.

  Inside a stream callback, `stream` is the calling process itself:
  `Quichex.Stream.send/3`, `close/1`, `shutdown/3` and `info/1` on it work
  as anywhere else (`recv/2` returns `{:error, :active}`: data comes as
  callbacks). Streams you open yourself (`Quichex.Connection.open_stream/3`,
  e.g. from `c:handle_connection/2`) belong to the process that opened them,
  and their messages arrive as `c:handle_info/2` there.

  ## Return values

  Every callback except `c:handle_close/3` returns one of:

    * `{:continue, state}` - keep going.
    * `{:continue, state, timeout}` - keep going; if no event arrives within
      `timeout` ms, `c:handle_timeout/2` runs, with the stream (in a stream
      process) or the connection (in the connection process). `timeout` is
      as everywhere in Quichex: #{Quichex.Config.Schema.timeout_doc()}.
      Any other value is a bad return value, handled like a raise (below).
    * `{:close, state}` - finish normally. For a stream: FIN on the sending
      side if it is still open, STOP_SENDING (code 0) on the receiving side if
      the peer has not finished, then the process exits. For a connection:
      CONNECTION_CLOSE with code 0.
    * `{:error, reason, state}` - abort. For a stream: RESET_STREAM (unless
      our FIN was already accepted) and STOP_SENDING with code `#{0x0102}`
      (`error_code/0`). For a connection: CONNECTION_CLOSE with application
      code `#{0x0102}`.

  A stream ends by itself once both directions are done (the peer's FIN or
  reset was handled and our FIN was sent, or our sending side was stopped
  or reset): its process exits after the callback that finished it.

  A handler that raises takes down only its own stream or connection: a
  stream callback that raises aborts its stream with the owner-down code
  (`Quichex.Stream.owner_down_error_code/0`, `#{0x0101}`) and logs the
  error; a connection handler's crash closes its connection (application
  code 0). The listener and other connections are not affected.

  ## Example: echo

      defmodule Echo do
        use Quichex.Handler

        @impl Quichex.Handler
        def handle_data(data, stream, state) do
          :ok = Quichex.Stream.send(stream, data)
          {:continue, state}
        end

        @impl Quichex.Handler
        def handle_fin(stream, state) do
          :ok = Quichex.Stream.close(stream)
          {:close, state}
        end
      end

  ## Example: a request/response protocol that answers once

      defmodule Upcase do
        use Quichex.Handler

        @impl Quichex.Handler
        def handle_stream_open(_stream, _opts), do: {:continue, []}

        @impl Quichex.Handler
        def handle_data(data, _stream, acc), do: {:continue, [acc | data], 10_000}

        @impl Quichex.Handler
        def handle_fin(stream, acc) do
          :ok = Quichex.Stream.send(stream, acc |> IO.iodata_to_binary() |> String.upcase(), fin: true)
          {:close, acc}
        end

        @impl Quichex.Handler
        def handle_timeout(_stream, acc), do: {:error, :too_slow, acc}
      end

  ## Example: server push and connection events

      defmodule Greeter do
        use Quichex.Handler
        require Logger

        @impl Quichex.Handler
        def handle_connection(conn, state) do
          {:ok, stream} = Quichex.Connection.open_stream(conn, :unidirectional)
          :ok = Quichex.Stream.send(stream, "welcome", fin: true)
          {:continue, state}
        end

        @impl Quichex.Handler
        def handle_close(_conn, reason, _state) do
          Logger.info("connection closed: \#{inspect(reason)}")
        end

        @impl Quichex.Handler
        def handle_reset(code, _stream, state) do
          Logger.warning("peer reset a stream with \#{code}")
          {:close, state}
        end
      end
  """

  @typedoc "What a callback returns."
  @type result ::
          {:continue, state :: term()}
          | {:continue, state :: term(), timeout()}
          | {:close, state :: term()}
          | {:error, reason :: term(), state :: term()}

  @typedoc "A stream process (see `Quichex.Stream`)."
  @type stream :: pid()
  @typedoc "A connection process (see `Quichex.Connection`)."
  @type conn :: pid()

  @doc "The connection's handshake completed. Runs in the connection process."
  @callback handle_connection(conn(), state :: term()) :: result()

  @doc "The connection closed (`reason` as in `{:quic_connection_closed, ...}`). The return value is ignored."
  @callback handle_close(conn(), reason :: term(), state :: term()) :: term()

  @doc "Any other message to the connection process."
  @callback handle_info(msg :: term(), state :: term()) :: result()

  @doc """
  A DATAGRAM frame (RFC 9221) arrived on `conn`, in the order received.
  Runs in the connection handler process. Needs `enable_dgram` in the
  listener's config; answer with `Quichex.Connection.dgram_send/3`.
  """
  @callback handle_datagram(data :: binary(), conn(), state :: term()) :: result()

  @doc """
  The client offered 0-RTT data: `outcome` is `:accepted` or
  `{:rejected, reason}`. Runs in the connection handler process right after
  `c:handle_connection/2`; stream callbacks for 0-RTT data may have run
  already (see the guide on 0-RTT and replay).
  """
  @callback handle_early_data(outcome :: :accepted | {:rejected, atom()}, state :: term()) ::
              result()

  @doc """
  A network path event on the connection: `{:path_created, path_id, local,
  peer}`, `{:path_validated, path_id}`, `{:path_failed, path_id, reason}`
  or `{:peer_migrated, old_peer, new_peer}` (the client moved; the
  connection followed). Runs in the connection handler process.
  """
  @callback handle_path_event(event :: tuple(), conn(), state :: term()) :: result()

  @doc "The peer opened `stream`. First callback of a stream process."
  @callback handle_stream_open(stream(), state :: term()) :: result()

  @doc "A chunk of data arrived on `stream`."
  @callback handle_data(data :: binary(), stream(), state :: term()) :: result()

  @doc "The peer finished its side of `stream` (FIN)."
  @callback handle_fin(stream(), state :: term()) :: result()

  @doc "The peer reset its side of `stream` (RESET_STREAM) with `error_code`."
  @callback handle_reset(error_code :: non_neg_integer(), stream(), state :: term()) :: result()

  @doc """
  The peer asked us to stop sending on `stream` (STOP_SENDING) with
  `error_code`; later sends return `{:error, {:stopped, code}}`. Receiving
  goes on: the default keeps the stream (`{:continue, state}`), so data that
  already arrived still reaches `c:handle_data/3` and `c:handle_fin/2`.
  """
  @callback handle_stopped(error_code :: non_neg_integer(), stream(), state :: term()) :: result()

  @doc "Any other message to a stream process."
  @callback handle_info(msg :: term(), stream(), state :: term()) :: result()

  @doc "No event arrived within the timeout of a `{:continue, state, timeout}` (stream or connection)."
  @callback handle_timeout(stream() | conn(), state :: term()) :: result()

  @optional_callbacks handle_connection: 2,
                      handle_close: 3,
                      handle_info: 2,
                      handle_datagram: 3,
                      handle_early_data: 2,
                      handle_path_event: 3,
                      handle_stream_open: 2,
                      handle_data: 3,
                      handle_fin: 2,
                      handle_reset: 3,
                      handle_stopped: 3,
                      handle_info: 3,
                      handle_timeout: 2

  @handler_error_code 0x0102

  @doc """
  The application error code used for `{:error, reason, state}` results:
  `#{@handler_error_code}`.

      iex> Quichex.Handler.error_code()
      #{@handler_error_code}
  """
  @spec error_code() :: non_neg_integer()
  def error_code, do: @handler_error_code

  defmacro __using__(_opts) do
    quote do
      @behaviour Quichex.Handler

      @impl Quichex.Handler
      def handle_connection(_conn, state), do: {:continue, state}

      @impl Quichex.Handler
      def handle_close(_conn, _reason, _state), do: :ok

      @impl Quichex.Handler
      def handle_info(_msg, state), do: {:continue, state}

      @impl Quichex.Handler
      def handle_datagram(_data, _conn, state), do: {:continue, state}

      @impl Quichex.Handler
      def handle_early_data(_outcome, state), do: {:continue, state}

      @impl Quichex.Handler
      def handle_path_event(_event, _conn, state), do: {:continue, state}

      @impl Quichex.Handler
      def handle_stream_open(_stream, state), do: {:continue, state}

      @impl Quichex.Handler
      def handle_data(_data, _stream, state), do: {:continue, state}

      @impl Quichex.Handler
      def handle_fin(_stream, state), do: {:close, state}

      @impl Quichex.Handler
      def handle_reset(_error_code, _stream, state), do: {:close, state}

      @impl Quichex.Handler
      def handle_stopped(_error_code, _stream, state), do: {:continue, state}

      @impl Quichex.Handler
      def handle_info(_msg, _stream, state), do: {:continue, state}

      @impl Quichex.Handler
      def handle_timeout(_stream_or_conn, state), do: {:close, state}

      defoverridable handle_connection: 2,
                     handle_close: 3,
                     handle_info: 2,
                     handle_datagram: 3,
                     handle_early_data: 2,
                     handle_path_event: 3,
                     handle_stream_open: 2,
                     handle_data: 3,
                     handle_fin: 2,
                     handle_reset: 3,
                     handle_stopped: 3,
                     handle_info: 3,
                     handle_timeout: 2
    end
  end
end
