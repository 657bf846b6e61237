# Chat: `mix run examples/chat.exs`.
#
# A Quichex.Listener runs the Chat.Room handler. Each client opens one
# bidirectional stream and speaks a line protocol: first `JOIN <name>`,
# answered with `WELCOME <name>`, then one message per line. The handler
# process serving each client stream registers itself in a Registry started
# by this script; every message line it receives is sent, as `<name>: <text>`,
# to every registered handler process, and each one writes it to its own
# client's stream. Three clients on loopback join, each sends a few lines,
# and the script checks that every client received every message, in each
# sender's order, then prints the conversation. The self-signed certificate
# comes from Quichex.DevCert (what `mix quichex.gen.cert` writes), in a
# temporary directory removed at the end. The script is short already:
# `make test` runs it as it is.

defmodule Chat.Room do
  @moduledoc "Serves one client stream of the chat: joins the room, broadcasts its lines."
  use Quichex.Handler

  @registry Chat.Registry

  @impl Quichex.Handler
  def handle_stream_open(_stream, _options), do: {:continue, %{name: nil, buffer: ""}}

  # Data arrives in arbitrary chunks: keep the partial last line.
  @impl Quichex.Handler
  def handle_data(data, stream, state) do
    {lines, rest} = split_lines(state.buffer <> data)
    state = Enum.reduce(lines, %{state | buffer: rest}, &handle_line(&1, stream, &2))
    {:continue, state}
  end

  # A broadcast from another handler process (or this one): write it out.
  @impl Quichex.Handler
  def handle_info({:chat_line, line}, stream, state) do
    :ok = Quichex.Stream.send(stream, [line, "\n"])
    {:continue, state}
  end

  # The client is done: leave the room (the Registry forgets this process
  # when it exits) and finish our side of the stream.
  @impl Quichex.Handler
  def handle_fin(stream, state) do
    _ = Quichex.Stream.close(stream)
    {:close, state}
  end

  defp handle_line("JOIN " <> name, stream, %{name: nil} = state) do
    {:ok, _owner} = Registry.register(@registry, :room, name)
    :ok = Quichex.Stream.send(stream, "WELCOME #{name}\n")
    %{state | name: name}
  end

  defp handle_line(text, _stream, %{name: name} = state) when is_binary(name) do
    Registry.dispatch(@registry, :room, fn members ->
      for {pid, _name} <- members, do: send(pid, {:chat_line, "#{name}: #{text}"})
    end)

    state
  end

  defp split_lines(buffer) do
    parts = String.split(buffer, "\n")
    {Enum.drop(parts, -1), List.last(parts)}
  end
end

defmodule Chat do
  @alpn "quichex-chat"
  @script %{
    "alice" => ["hi all", "anyone up for lunch?"],
    "bob" => ["hello alice", "lunch sounds good"],
    "carol" => ["hey", "count me in", "12:30?"]
  }

  def run do
    dir = Path.join(System.tmp_dir!(), "quichex-chat-#{System.unique_integer([:positive])}")

    result =
      try do
        chat(dir)
      after
        File.rm_rf!(dir)
      end

    if result != :ok, do: System.halt(1)
  end

  defp chat(dir) do
    %{cert: cert, key: key} = Quichex.DevCert.write!(output: Path.join(dir, "selfsigned"))
    {:ok, _} = Registry.start_link(keys: :duplicate, name: Chat.Registry)

    server_config =
      Quichex.Config.new(
        application_protos: [@alpn],
        load_cert_chain_from_pem_file: cert,
        load_priv_key_from_pem_file: key
      )

    {:ok, listener} =
      Quichex.Listener.start_link(
        ip: {127, 0, 0, 1},
        port: 0,
        config: server_config,
        handler: Chat.Room
      )

    {:ok, {_ip, port}} = Quichex.Listener.sockname(listener)
    IO.puts("chat room (Chat.Room handler) on 127.0.0.1:#{port}")

    client_config =
      Quichex.Config.new(application_protos: [@alpn], load_verify_locations_from_file: cert)

    parent = self()
    names = @script |> Map.keys() |> Enum.sort()

    clients =
      for name <- names do
        Task.async(fn -> client(name, port, client_config, parent) end)
      end

    # Nobody speaks before everyone has joined, so everyone hears everything.
    joined = for _ <- names, do: receive_joined()
    Enum.each(joined, fn {_name, pid} -> send(pid, :go) end)

    heard = Map.new(clients, &Task.await(&1, 15_000))
    :ok = Quichex.Listener.stop(listener)

    expected = for name <- names, text <- @script[name], do: "#{name}: #{text}"

    IO.puts("\nconversation as alice saw it:")
    Enum.each(heard["alice"], &IO.puts("  " <> &1))

    failures =
      for name <- names, problem = check(heard[name], expected, names), problem != nil do
        "#{name}: #{problem}"
      end

    IO.puts("")

    for name <- names do
      IO.puts("#{name} heard #{length(heard[name])}/#{length(expected)} messages")
    end

    if failures == [] do
      IO.puts(
        "PASS: #{length(names)} clients, #{length(expected)} messages, " <>
          "every client heard every message in each sender's order"
      )
    else
      IO.puts("FAIL: #{Enum.join(failures, "; ")}")
      :error
    end
  end

  defp receive_joined do
    receive do
      {:joined, name, pid} -> {name, pid}
    after
      10_000 -> raise "a client did not join in time"
    end
  end

  # Same messages, and each sender's messages in the order sent (messages
  # from different senders may interleave differently for each client).
  defp check(heard, expected, names) do
    cond do
      Enum.sort(heard) != Enum.sort(expected) ->
        "heard #{inspect(heard)}"

      Enum.any?(names, &(from(heard, &1) != from(expected, &1))) ->
        "out of order: #{inspect(heard)}"

      true ->
        nil
    end
  end

  defp from(lines, name), do: Enum.filter(lines, &String.starts_with?(&1, name <> ": "))

  # One client: connect, join, wait for :go, say its lines, read until it
  # has heard every message, then finish its stream and close.
  defp client(name, port, config, parent) do
    {:ok, conn} =
      Quichex.Connection.connect(
        host: {127, 0, 0, 1},
        port: port,
        server_name: "localhost",
        config: config
      )

    :ok = Quichex.Connection.wait_connected(conn, timeout: 5_000)
    {:ok, stream} = Quichex.Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Quichex.Stream.send(stream, "JOIN #{name}\n")
    {["WELCOME " <> ^name], buffer} = read_lines(stream, "", 1, [])
    send(parent, {:joined, name, self()})

    receive do
      :go -> :ok
    end

    for text <- @script[name], do: :ok = Quichex.Stream.send(stream, text <> "\n")

    total = @script |> Map.values() |> Enum.map(&length/1) |> Enum.sum()
    {heard, ""} = read_lines(stream, buffer, total, [])

    :ok = Quichex.Stream.close(stream)
    # The server finishes its side in reply.
    {:ok, "", true} = Quichex.Stream.recv(stream, timeout: 5_000)
    :ok = Quichex.Connection.close(conn, error_code: 0, reason: "bye")
    {name, heard}
  end

  # Reads until `count` complete lines arrived; returns them and the rest.
  defp read_lines(_stream, buffer, count, acc) when length(acc) >= count,
    do: {Enum.reverse(acc), buffer}

  defp read_lines(stream, buffer, count, acc) do
    {:ok, data, false} = Quichex.Stream.recv(stream, timeout: 5_000)
    parts = String.split(buffer <> data, "\n")
    lines = Enum.drop(parts, -1)
    read_lines(stream, List.last(parts), count, Enum.reverse(lines, acc))
  end
end

Chat.run()
